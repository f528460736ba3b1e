"""IGPO's framework-free pieces: hints cut from a reference trace, group replacement, hint-loss filter.

IGPO (arXiv 2509.10396) rescues GRPO groups whose G rollouts are all wrong (zero advantage, zero
gradient): it samples G extra answers from a masked diffusion LLM with chunks of the reference
reasoning fixed in place (inpainting), swaps some correct ones into the group, and trains on the
hint tokens only where the policy was most uncertain. Everything here is plain Python or one torch
op per call so that the sampler, the trainer and the tests share one definition of each rule.
"""
from __future__ import annotations

import math
import random
import re
from fractions import Fraction

import torch
from pydantic import Field, model_validator

from rl.algorithms.entropy import top_entropy_mask
from rl.core.schema import Section

GSM8K_MARKER = "####"
METAMATH_MARKER = "The answer is:"  # MetaMathQA's final line; its responses are IGPO's training traces
BOXED_OPEN = "\\boxed{"
# Characters a final statement may end with after the answer ("... is $12$.", "... = 12)").
_TRAILING_PUNCTUATION = r"[\s.,;:!$)\]}]*"


class HintSettings(Section):
    """How hints are cut from the reference reasoning; defaults are the paper's. IGPO's config
    section inherits these options, so they are declared and checked here only."""

    chunk_min: int = Field(
        5, ge=1, strict=True, description="Reference reasoning is cut into consecutive chunks of chunk_min..chunk_max tokens [5-10]."
    )
    chunk_max: int = Field(10, ge=1, strict=True)
    reveal_min: float = Field(
        0.2, ge=0, le=1, description="Each inpainted sample reveals a fraction eta ~ U[reveal_min, reveal_max] of the chunks [0.2-0.6]."
    )
    reveal_max: float = Field(0.6, ge=0, le=1)
    free_tail: int = Field(
        30, ge=0, strict=True, description="The last answer positions never get hints, leaving room to conclude [about 30]."
    )
    exclude_answer: bool = Field(
        True, strict=True, description="Leave the final answer out of the hints (the paper), so that a repaired response derives it."
    )
    released_variant: bool = Field(
        False,
        strict=True,
        description="The released code's hints instead: the last chunk always revealed, a final remainder "
        "shorter than chunk_min never a chunk, chunk spacing stretched by up to stretch_max, and the reveal "
        "count rounded up (it masks floor((1-eta)N) chunks; the paper reveals floor(eta N)).",
    )
    stretch_max: float = Field(
        1.5, ge=1, description="released_variant: revealed chunks' spacing is stretched by a factor of up to this [1.5, "
        "the released code; it only ever widens the spacing, so 1 is no stretch]."
    )
    max_spacing: int = Field(100, ge=0, strict=True, description="released_variant: each stretched gap is capped at this many tokens.")

    @model_validator(mode="after")
    def _ordered_bounds(self) -> "HintSettings":
        if self.chunk_max < self.chunk_min:
            raise ValueError(f"chunk_max ({self.chunk_max}) must be >= chunk_min ({self.chunk_min}); raise chunk_max or lower chunk_min")
        if self.reveal_min > self.reveal_max:
            raise ValueError(
                f"reveal_min ({self.reveal_min}) must be <= reveal_max ({self.reveal_max}): they bound the fraction of chunks revealed"
            )
        return self


def strip_final_answer(solution: str, answer: str) -> str:
    """The solution text without its final-answer statement.

    The paper keeps the final answer out of the hints: a hint that states the answer would make
    the inpainted sample correct by copying, which teaches nothing about reasoning. Removed:
    1. everything from the last "####" (GSM8K) and from the last "The answer is:" (MetaMathQA);
    2. every \\boxed{...} group (braces balanced; to the end of the text if never closed),
       together with a "$" right before and after it;
    3. only when none of the above was present: `answer` at the very end of the text, followed
       by nothing but whitespace and . , ; : ! $ ) ] } (removed too), with a "$" right before it
       (removed too), and not glued to a letter or digit before that (so "112" never loses
       "12"). An explicit marker already identified the
       answer, so the reasoning before it (e.g. "5+7=12.") is kept whole.
    Trailing whitespace is dropped.
    """
    text = solution
    found_marker = False
    for marker in (GSM8K_MARKER, METAMATH_MARKER):
        cut = text.rfind(marker)
        if cut != -1:
            text, found_marker = text[:cut], True
    if BOXED_OPEN in text:
        text, found_marker = _remove_boxed(text), True
    answer = answer.strip()
    if not found_marker and answer:
        text = re.sub(r"(?<![A-Za-z0-9])\$?" + re.escape(answer) + _TRAILING_PUNCTUATION + r"\Z", "", text)
    return text.rstrip()


def _remove_boxed(text: str) -> str:
    while (start := text.find(BOXED_OPEN)) != -1:
        end = _after_closing_brace(text, start + len(BOXED_OPEN))
        if text[start - 1:start] == "$" and text[end:end + 1] == "$":
            start, end = start - 1, end + 1
        text = text[:start] + text[end:]
    return text


def _after_closing_brace(text: str, inside: int) -> int:
    """Index just past the brace closing the group opened before `inside`; len(text) if unclosed."""
    depth = 1
    for i in range(inside, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i + 1
    return len(text)


def reasoning_token_ids(solution: str, answer: str, tokenizer, exclude_answer: bool) -> list[int]:
    """Token ids of the reference reasoning that hints are cut from.

    No special tokens: hint token j goes to answer position j, so a BOS would shift every hint by one.
    exclude_answer applies `strip_final_answer` (the paper); without it the whole solution is used,
    as the released code does with MetaMathQA responses ("The answer is: N" included).
    """
    text = strip_final_answer(solution, answer) if exclude_answer else solution
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk_spans(n_tokens: int, rng: random.Random, chunk_min: int, chunk_max: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) chunks covering 0..n_tokens; sizes uniform in [chunk_min, chunk_max].

    Only the last chunk can be shorter (whatever was left). Chunks rather than single tokens: an
    isolated revealed token says little, a few consecutive ones state a step of the reasoning.
    """
    if chunk_min < 1 or chunk_max < chunk_min:
        raise ValueError(f"Need 1 <= chunk_min <= chunk_max, got chunk_min={chunk_min}, chunk_max={chunk_max}.")
    spans = []
    start = 0
    while start < n_tokens:
        end = min(n_tokens, start + rng.randint(chunk_min, chunk_max))
        spans.append((start, end))
        start = end
    return spans


def revealed_chunk_count(n_chunks: int, eta: float, released_variant: bool) -> int:
    """How many of n_chunks chunks a sample with reveal fraction eta shows (before any forced last chunk).

    Paper (arXiv 2509.10396, "reveal a fraction eta of the chunks"): floor(eta * n), so a very short
    trace may get no hint at all (that sample is then an ordinary one). Released code: it draws the
    chunks to *mask*, int((1 - eta) * n), and reveals the rest (so it rounds the reveal count up).
    eta * n is rounded to 9 decimals before the floor, so float noise (0.6 * 5 = 2.9999...) cannot
    drop a chunk.
    """
    if n_chunks == 0:
        return 0
    if released_variant:
        return n_chunks - int(n_chunks * (1.0 - eta))
    return min(n_chunks, math.floor(round(eta * n_chunks, 9)))


def build_hints(
    reasoning_ids: list[int], answer_length: int, count: int, rng: random.Random, settings: HintSettings
) -> list[dict[int, int]]:
    """`count` hints, each {answer position: token id}, one per extra sample.

    Each sample re-chunks the trace and draws its own reveal fraction eta ~ U[reveal_min,
    reveal_max], so the group sees varied amounts and cuts of guidance; the reward then tells which
    amount sufficed. The trace is first cut to answer_length - free_tail tokens: the last free_tail
    positions stay free so that the model can still write its own ending and final answer.
    Paper: trace token j goes to answer position j. Released variant: see `_stretched_starts`.
    """
    if answer_length < 0 or count < 0:
        raise ValueError(f"answer_length and count must be >= 0, got {answer_length} and {count}.")
    if settings.reveal_max == 0:
        # The release's "inpainting ratio = 0" baseline (igpo run_igpo.sh:6-7): generate_inpainting
        # takes its no-hint branch (utils/generate.py:771, 821-831), even for the released variant's
        # always-revealed last chunk, so the group is resampled plainly.
        return [{} for _ in range(count)]
    hint_area = max(0, answer_length - settings.free_tail)
    trace = reasoning_ids[:hint_area]
    # The released code measures the stretch against the whole trace, before the cut.
    stretch = min(settings.stretch_max, max(1.0, hint_area / len(reasoning_ids))) if reasoning_ids else 1.0
    return [_one_hint(trace, hint_area, stretch, rng, settings) for _ in range(count)]


def _one_hint(trace: list[int], hint_area: int, stretch: float, rng: random.Random, settings: HintSettings) -> dict[int, int]:
    spans = chunk_spans(len(trace), rng, settings.chunk_min, settings.chunk_max)
    if settings.released_variant and spans and spans[-1][1] - spans[-1][0] < settings.chunk_min:
        spans.pop()  # the released code finds a too-short remainder too hard to inpaint around
    if not spans:
        return {}
    eta = rng.uniform(settings.reveal_min, settings.reveal_max)
    chosen = set(rng.sample(range(len(spans)), revealed_chunk_count(len(spans), eta, settings.released_variant)))
    if settings.released_variant:
        chosen.add(len(spans) - 1)
    revealed = [spans[i] for i in sorted(chosen)]
    if settings.released_variant:
        starts = _stretched_starts(revealed, stretch, settings.max_spacing)
    else:
        starts = [start for start, _ in revealed]
    hint = {}
    for (start, end), placed in zip(revealed, starts):
        for offset in range(end - start):
            if placed + offset < hint_area:  # a stretched chunk may run past the hint area: cut it there
                hint[placed + offset] = trace[start + offset]
    return hint


def _stretched_starts(revealed: list[tuple[int, int]], stretch: float, max_spacing: int) -> list[int]:
    """Answer positions of the revealed chunks in the released code's layout.

    A dLLM answer is usually longer than the reference trace; stretching the gaps between revealed
    chunks (never their contents) spreads the hints over more of the answer. The first chunk starts
    at int(start * stretch); each later one starts int(gap * stretch) (at most max_spacing) after
    the previous placed chunk's end, where gap is the number of hidden trace tokens between them.
    """
    starts: list[int] = []
    for i, (start, end) in enumerate(revealed):
        if i == 0:
            starts.append(int(start * stretch))
        else:
            previous_start, previous_end = revealed[i - 1]
            placed_previous_end = starts[-1] + previous_end - previous_start
            starts.append(placed_previous_end + min(int((start - previous_end) * stretch), max_spacing))
    return starts


def is_all_wrong(correct: list[bool]) -> bool:
    """True for a non-empty group with no correct response: the only case IGPO acts on.

    Such a group has zero reward variance, hence zero advantage and no gradient; a group with any
    correct response already has signal and is left alone. An empty group has nothing to rescue.
    """
    return bool(correct) and not any(correct)


def _floor_fraction(fraction: float, n: int) -> int:
    # Exact decimal arithmetic: 0.29 * 100 is 28.999999999999996 in floats, and must count as 29.
    return int(Fraction(str(fraction)) * n)


def plan_replacements(correct_in_group: list[bool], inpainted_correct: list[bool], max_fraction: float) -> list[tuple[int, int]]:
    """(group slot to overwrite, inpainted sample to put there) pairs; [] unless the group is all wrong.

    At most floor(max_fraction * G) slots are replaced, so at least the rest of the group stays the
    policy's own unguided (wrong) attempts: the mixed group then has both rewards and a non-zero
    advantage, without turning the update into imitation of guided samples. Only correct
    inpainted samples are used (a wrong one adds no signal), each once, into distinct wrong slots.
    Taking the first correct samples is as good as a random pick: each one's hint was drawn
    independently, so their order carries no information.
    """
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}.")
    if not is_all_wrong(correct_in_group):
        return []
    wrong_slots = [i for i, ok in enumerate(correct_in_group) if not ok]
    donors = [j for j, ok in enumerate(inpainted_correct) if ok]
    limit = _floor_fraction(max_fraction, len(correct_in_group))
    return list(zip(wrong_slots, donors))[:limit]


def hint_loss_mask(
    entropy: torch.Tensor, hint_mask: torch.Tensor, completion_mask: torch.Tensor, keep_fraction: float
) -> torch.Tensor:
    """Loss mask [B, T] (dtype of completion_mask): generated tokens, plus each row's top-entropy hints.

    Hint tokens were not sampled by the policy, so their ratio and gradient are off-policy; the
    paper found training unstable when all of them enter the loss (keep_fraction 1) and keeps only
    the ones where the old policy was most uncertain, i.e. where the hint teaches the most.
    Hints are the positions where both hint_mask and completion_mask are set; per row,
    max(1, floor(keep_fraction * n_hints)) of them are kept (the released code's count: at least
    one; keep_fraction * n is rounded to 9 decimals first so float noise cannot drop a token).
    Ties in entropy go to the earlier position, so the mask is deterministic. Padding stays 0.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}.")
    if not entropy.shape == hint_mask.shape == completion_mask.shape or entropy.dim() != 2:
        raise ValueError(
            "entropy, hint_mask and completion_mask must share one [B, T] shape, got "
            f"{tuple(entropy.shape)}, {tuple(hint_mask.shape)}, {tuple(completion_mask.shape)}."
        )
    in_completion = completion_mask > 0
    hints = in_completion & (hint_mask > 0)
    kept_hints = top_entropy_mask(entropy, hints, keep_fraction, scope="sequence", round_up=False) > 0
    return ((in_completion & ~hints) | kept_hints).to(completion_mask.dtype)
