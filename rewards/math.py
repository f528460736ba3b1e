"""Built-in rewards: math answer correctness (math-verify), boxed format, overlong length penalty.

Gold answers are extracted from dataset rows once, at load (rl.data uses `gsm8k_gold` and
`last_boxed` from here); the rewards compare a completion's final answer with that `answer`.
"""
from __future__ import annotations

import functools
import logging
import re
import threading
from typing import Literal, get_args

from rewards.registry import register_reward

_GSM8K_GOLD = re.compile(r"####\s*(.+?)\s*$", re.S)
_GSM8K_FINAL = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
# "12 dollars", "\frac{1}{2} cups": plain-word units after a number; LaTeX would read them as a
# product of single-letter symbols.
_WORD_UNITS = re.compile(r"^(.*?[\d}])\s+(?:[A-Za-z]{2,}\s*)+$")
# The answer fallbacks (final_answer's `fallback`); rl.config's options take their type from here.
AnswerFallback = Literal["none", "last_number", "math_verify"]
ANSWER_FALLBACKS = get_args(AnswerFallback)

# Set in reward worker processes: there the process kill is the deadline, so math-verify's own
# signal.alarm timeouts are turned off (they would also turn a hang into a silent 0).
_SIGNAL_TIMEOUTS = True


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


def _balanced_from(text: str, start: int) -> str | None:
    """The stripped content of the `\\boxed{...}` that starts at `start`, braces balanced; None if
    `start` is not a `\\boxed{` or the braces never close."""
    if not text.startswith("\\boxed{", start):
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def first_boxed(text: str) -> str | None:
    """Content of the FIRST \\boxed{...}, braces balanced, stripped; None if there is none or it never
    closes. IGPO's released reward reads this one (facebookresearch/igpo utils/reward_func.py
    `extract_boxed_answer`), where the other rewards here read the last."""
    return _balanced_from(text, text.find("\\boxed{"))


def final_answer(completion: str, fallback: str = "last_number") -> str | None:
    """The completion's final answer: the last \\boxed{}, else a GSM8K `#### N` line, else `fallback`.

    fallback: "none" (no answer), "last_number" (the last number in the text) or "math_verify"
    (math-verify's own extraction over the whole text: "final answer is", last LaTeX expression).
    """
    if fallback not in ANSWER_FALLBACKS:
        raise ValueError(f"answer fallback {fallback!r} is not one of {ANSWER_FALLBACKS}")
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    hashes = _GSM8K_FINAL.findall(completion)
    if hashes:
        return hashes[-1].replace(",", "").strip()
    if fallback == "last_number":
        numbers = _NUMBER.findall(completion)
        return numbers[-1].replace(",", "") if numbers else None
    if fallback == "math_verify":
        parsed = _parse(completion)
        return parsed[-1] if parsed else None
    return None


def disable_signal_timeouts() -> None:
    """Run math-verify without its signal.alarm timeouts (for killable worker processes)."""
    global _SIGNAL_TIMEOUTS
    _SIGNAL_TIMEOUTS = False
    # Without this, math-verify warns on every call that its timeout is disabled.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _timeouts() -> tuple[dict, dict]:
    # signal.alarm only works in the main thread; elsewhere math-verify raises ValueError.
    if _SIGNAL_TIMEOUTS and threading.current_thread() is threading.main_thread():
        return {}, {}
    return {"parsing_timeout": None}, {"timeout_seconds": None}


def _parse(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], **_timeouts()[0])


def _clean(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    m = _WORD_UNITS.match(answer)
    return m.group(1) if m else answer


@functools.lru_cache(maxsize=4096)
def _parse_answer(answer: str) -> tuple:
    # Wrapping in \boxed{} makes math-verify read the whole string as one answer (so "2+" is left
    # unparsed instead of read as 2) and applies its unit/\text/percent normalisation.
    return tuple(_parse(f"\\boxed{{{answer}}}"))


def answers_match(predicted: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings (LaTeX or plain); empty never matches."""
    from math_verify import verify

    predicted, gold = _clean(predicted), _clean(gold)
    if not predicted:
        return False
    gold_parsed, pred_parsed = _parse_answer(gold), _parse_answer(predicted)
    if not gold_parsed or not pred_parsed:
        return predicted == gold
    return bool(verify(list(gold_parsed), list(pred_parsed), **_timeouts()[1]))


@register_reward("math_verify", correctness=True)
def math_verify_reward(completion: str, answer: str, *, answer_fallback: str = "last_number", **row) -> float:
    """1.0 if the completion's final answer equals the gold `answer`, else 0.0.

    The final answer is the last \\boxed{} content, else a `#### N` line, else `answer_fallback`
    (default the last number: small models often answer without the box; this keeps their signal).
    """
    predicted = final_answer(completion, answer_fallback)
    return 1.0 if predicted is not None and answers_match(predicted, str(answer)) else 0.0


@register_reward("first_boxed_correct", correctness=True)
def first_boxed_correct_reward(completion: str, answer: str, **row) -> float:
    """IGPO's released correctness: 1.0 if the FIRST \\boxed{} content equals the gold `answer`
    (math-verify equivalence), else 0.0; no box, no credit (facebookresearch/igpo reward_func.py
    `correctness_reward_func`, weight 3.0 there). The release compares with its own parser
    (`manual_math_verify`); math-verify is this project's one checker."""
    predicted = first_boxed(completion)
    return 1.0 if predicted and answers_match(predicted, str(answer)) else 0.0


@register_reward("last_boxed_correct", correctness=True)
def last_boxed_correct_reward(completion: str, answer: str, **row) -> float:
    """The OPSD release's evaluation grading (siyan-zhao/OPSD eval/evaluate_math.py:15-86 at 7448751):
    the LAST `\\boxed` of the whole output (thinking included), which must open with a brace; no box,
    no answer: wrong (no last-number or `####` fallback). Equivalence by math-verify, as the release."""
    predicted = _balanced_from(completion, completion.rfind("\\boxed"))
    return 1.0 if predicted and answers_match(predicted, str(answer)) else 0.0


@register_reward("boxed_after_think_correct", correctness=True)
def boxed_after_think_correct_reward(completion: str, answer: str, **row) -> float:
    """The OPSD release's GRPO reward (siyan-zhao/OPSD grpo_train.py:49-114 at 85d6bf9): the FIRST
    `\\boxed{}` after the last `</think>` (the whole text when there is none), compared by math-verify,
    then as whitespace-free lowercase strings; 1 or 0. The gold is the data set's `Answer` column
    (data.answer_key)."""
    end = completion.rfind("</think>")
    text = completion[end + len("</think>"):] if end >= 0 else completion
    predicted = _balanced_from(text, text.find("\\boxed{"))
    if not predicted:
        return 0.0
    if answers_match(predicted, str(answer)):
        return 1.0
    squash = lambda s: "".join(s.split()).lower()  # noqa: E731  (the release's string fallback)
    return 1.0 if squash(predicted) == squash(str(answer)) else 0.0


# IGPO's released format reward (utils/reward_func.py `count_xml`): each of these present exactly once.
_XML_TAGS = ("<reasoning>\n", "</reasoning>", "<answer>\n", "</answer>")


@register_reward("xmlcount")
def xmlcount_reward(completion: str, **row) -> float:
    """IGPO's (and d1's) xmlcount format reward, at the release's scale: 0.125 for each of
    `<reasoning>\\n`, `</reasoning>`, `<answer>\\n`, `</answer>` that occurs exactly once, plus 0.25
    if a `\\boxed{` occurs anywhere; at most 0.75. Use it with weight 1.0 to match the release."""
    score = sum(0.125 for tag in _XML_TAGS if completion.count(tag) == 1)
    return score + (0.25 if "\\boxed{" in completion else 0.0)


@register_reward("boxed_format")
def boxed_format_reward(completion: str, **row) -> float:
    """1.0 if the completion gives a non-empty final \\boxed{} answer, else 0.0 (format only)."""
    boxed = last_boxed(completion)
    return 1.0 if boxed is not None and boxed.strip() else 0.0


@register_reward("overlong")
def overlong_reward(
    completion: str, *, completion_tokens: int, max_tokens: int, overlong_buffer_frac: float = 0.2, **row
) -> float:
    """DAPO's soft overlong penalty: 0 up to max_tokens - buffer, then linear down to -1 at max_tokens.

    buffer = overlong_buffer_frac * max_tokens. The trainer passes `completion_tokens` (tokens
    sampled) and `max_tokens` (rollout.max_tokens); a truncated completion gets the full -1.
    """
    if completion_tokens >= max_tokens:
        return -1.0
    buffer = overlong_buffer_frac * max_tokens
    start = max_tokens - buffer
    return 0.0 if completion_tokens <= start else -(completion_tokens - start) / buffer
