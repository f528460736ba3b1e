"""What OPSD/OPD reports about its own failure modes (issue 27 §2), as pure functions of the step's
completions: answer leakage and the final-answer span (the teacher-student KL is split by it)."""
from __future__ import annotations

import re

BOXED = "\\boxed{"


def last_boxed_span(text: str) -> tuple[int, int] | None:
    """[start, end) of the last \\boxed{...} in `text`, braces balanced, the command included; None
    when there is none (an unclosed box runs to the end of the text)."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(BOXED)
    while i < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return start, i


def answer_token_mask(pieces: list[str]) -> list[float]:
    """1.0 for the tokens (as their decoded pieces, in order) that overlap the completion's last
    \\boxed{...} span, the final answer; all 0.0 without one: every token is then reasoning."""
    span = last_boxed_span("".join(pieces))
    mask, pos = [], 0
    for piece in pieces:
        end = pos + len(piece)
        mask.append(1.0 if span is not None and pos < span[1] and end > span[0] and piece else 0.0)
        pos = end
    return mask


def _normalised(answer: str) -> str:
    answer = answer.strip().replace(",", "").rstrip(".")
    return answer[:-2] if re.fullmatch(r"-?\d+\.0", answer) else answer


def states_answer(text: str, answer: str) -> bool:
    """Whether `text` states `answer`: as a whole number (not part of a longer one) for a numeric
    answer, else as a substring (both with thousands separators removed)."""
    answer, text = _normalised(answer), text.replace(",", "")
    if not answer:
        return False
    if re.fullmatch(r"-?\d+(\.\d+)?", answer):
        return re.search(rf"(?<![\d.]){re.escape(answer)}(?![\d]|\.\d)", text) is not None
    return answer in text


def leaks(opening: str, problem: str, answer: str) -> bool | None:
    """Whether a completion whose first tokens read `opening` states the gold `answer` there, before
    any reasoning; None (not measurable) when the problem text itself states the answer, since
    restating the problem is not a leak.

    Why this measure: the papers' leak is a student that learns to emit the answer the privileged
    teacher saw, without deriving it. On a task whose answer needs several steps, the first k tokens
    are too few to have computed it, so an answer stated there was recalled, not reasoned; a rising
    share over training is the leak, while an honest student's share stays near its (low) start.
    It cannot tell a leak from a lucky guess or an easy problem answered outright: read it as a
    trend against the first steps, not as an absolute rate.
    """
    if states_answer(problem, answer):
        return None
    return states_answer(opening, answer)
