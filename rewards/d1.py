"""d1's rewards (dllm-reasoning/d1@837888f, diffu-grpo/reward_func.py), rule for rule.

d1's diffu-GRPO trains GSM8K with five rewards of weight 1 (diffu_grpo_train.py:37-45): `d1_xmlcount`,
`d1_soft_format`, `d1_strict_format`, `d1_int` and `d1_correctness` (the correctness signal).
The answer is the text between the last `<answer>` and the next `</answer>`, stripped
(`extract_xml_answer`, reward_func.py:6-9); d1's gold is the GSM8K text after `####`.

`d1_gsm8k` is d1's GSM8K *evaluation* grading (eval/parse_and_get_acc.py:43-75), for the
`eval.grader` option: the first parseable `\\boxed{}` number, else the first `<answer>` block,
compared as floats with the gold number.
"""
from __future__ import annotations

import re

from rewards.registry import register_reward

_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$")  # no DOTALL, as d1
_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>")  # no DOTALL, as d1


def extract_xml_answer(text: str) -> str:
    """d1's `extract_xml_answer`: after the last `<answer>`, before the next `</answer>`, stripped."""
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


@register_reward("d1_correctness", correctness=True)
def d1_correctness_reward(completion: str, answer: str, **row) -> float:
    """2.0 if the `<answer>` text equals the gold answer exactly (string equality), else 0.0
    (d1 reward_func.py:18-39)."""
    return 2.0 if extract_xml_answer(completion) == str(answer).strip() else 0.0


@register_reward("d1_int")
def d1_int_reward(completion: str, **row) -> float:
    """0.5 if the `<answer>` text is all digits (str.isdigit), else 0.0 (d1 reward_func.py:42-45)."""
    return 0.5 if extract_xml_answer(completion).isdigit() else 0.0


@register_reward("d1_strict_format")
def d1_strict_format_reward(completion: str, **row) -> float:
    """0.5 for exactly `<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n` with no
    newline inside the two `...` (re.match without DOTALL, d1 reward_func.py:48-52)."""
    return 0.5 if _STRICT.match(completion) else 0.0


@register_reward("d1_soft_format")
def d1_soft_format_reward(completion: str, **row) -> float:
    """0.5 if the completion starts with `<reasoning>...</reasoning>`, whitespace, `<answer>...</answer>`
    (re.match, no DOTALL: the reasoning must be on one line; d1 reward_func.py:55-59)."""
    return 0.5 if _SOFT.match(completion) else 0.0


@register_reward("d1_xmlcount")
def d1_xmlcount_reward(completion: str, **row) -> float:
    """d1's `count_xml` (reward_func.py:62-74): 0.125 each for `<reasoning>\\n`, `\\n</reasoning>\\n`,
    `\\n<answer>\\n` and `\\n</answer>` occurring exactly once; with the `\\n<answer>\\n` credit,
    minus 0.001 per character after the last `\\n</answer>\\n` (the whole text when there is none);
    with the `\\n</answer>` credit, minus 0.001 per character after it beyond the first. No box credit
    (unlike IGPO's `xmlcount`)."""
    text, count = completion, 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


_BOXED = re.compile(r"\\boxed{(.*?)}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+\.?\d*")
_GOLD = re.compile(r"####\s*\$?([\d,]+(?:\.\d+)?)")


def d1_gsm8k_prediction(completion: str) -> float | None:
    """d1's GSM8K prediction (eval/parse_and_get_acc.py:43-73): the first `\\boxed{...}` (up to the
    first `}`) whose content is non-empty and not only dots, as a float, else the first number in
    it; if no box gives one, the first `<answer>...</answer>` as a float, else the last number in it."""
    for content in _BOXED.findall(completion):
        content = content.strip()
        if not content or set(content) == {"."}:
            continue
        try:
            return float(content)
        except ValueError:
            numbers = _NUMBER.findall(content)
            if numbers:
                return float(numbers[0])
    tag = _ANSWER_TAG.search(completion)
    if tag:
        text = tag.group(1).strip()
        try:
            return float(text)
        except ValueError:
            numbers = _NUMBER.findall(text)
            if numbers:
                return float(numbers[-1])
    return None


def d1_gsm8k_gold(answer: str) -> float | None:
    """The gold as a float: d1 parses `#### N` from the GSM8K solution (commas removed; its pattern
    has no minus sign, eval/parsers.py:104-114); our rows already hold the final answer, so a plain
    number is read directly (keeping its sign: see docs/paper_settings.md)."""
    text = str(answer)
    m = _GOLD.search(text)
    if m:
        text = m.group(1)
    try:
        return float(text.replace(",", "").strip())
    except ValueError:
        return None


@register_reward("d1_gsm8k", correctness=True)
def d1_gsm8k_reward(completion: str, answer: str, **row) -> float:
    """1.0 if d1's GSM8K prediction equals the gold number as floats, else 0.0 (no answer: wrong)."""
    predicted, gold = d1_gsm8k_prediction(completion), d1_gsm8k_gold(answer)
    return 1.0 if predicted is not None and gold is not None and predicted == gold else 0.0
