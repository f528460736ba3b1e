"""Built-in math rewards: answer correctness checked with math-verify, and answer extraction."""
from __future__ import annotations

import re

from rewards.registry import register_reward

_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.S)


def gsm8k_gold(worked_solution: str) -> str | None:
    """The final answer after `####` in a GSM8K solution, commas removed; None if absent."""
    m = _GSM8K_GOLD.search(worked_solution)
    return m.group(1).replace(",", "").strip() if m else None


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def answers_match(predicted: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain)."""
    from math_verify import LatexExtractionConfig, ExprExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(f"${gold}$", extraction_config=configs)
    if not gold_parsed:
        gold_parsed = parse(gold, extraction_config=configs)
    pred_parsed = parse(f"${predicted}$", extraction_config=configs)
    if not gold_parsed or not pred_parsed:
        return predicted.strip() == gold.strip()
    return bool(verify(gold_parsed, pred_parsed))


@register_reward("math_verify")
def math_verify_reward(completion: str, answer: str, **row) -> float:
    """1.0 if the completion's final answer equals the gold `answer`, else 0.0.

    The final answer is the last \\boxed{} content; without one, the last number in the text
    (small models often answer without the box; this fallback keeps their signal).
    """
    predicted = last_boxed(completion)
    if predicted is None:
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", completion)
        if not numbers:
            return 0.0
        predicted = numbers[-1].replace(",", "")
    return 1.0 if answers_match(predicted, str(answer)) else 0.0
