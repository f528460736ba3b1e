"""IGPO's pure pieces against plain loop references and properties that a wrong rule would break."""
import math
import random
from fractions import Fraction

import pytest
import torch

from rl.algorithms.inpainting import (
    HintSettings,
    build_hints,
    chunk_spans,
    hint_loss_mask,
    is_all_wrong,
    plan_replacements,
    reasoning_token_ids,
    revealed_chunk_count,
    strip_final_answer,
)


class CharTokenizer:
    """One token per character, id = code point: obviously correct and needs no model files."""

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False, "hint positions would shift by the special tokens"
        return {"input_ids": [ord(c) for c in text]}


def distinct_trace(n):
    """Token j has id 1000 + j, so a hint's value says which trace token it is."""
    return [1000 + j for j in range(n)]


def runs(positions):
    """Maximal runs of consecutive integers, as (first, last) pairs."""
    out = []
    for p in sorted(positions):
        if out and p == out[-1][1] + 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return [tuple(r) for r in out]


# ---- settings -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"chunk_min": 0}, "chunk_min"),
    ({"chunk_min": 6, "chunk_max": 5}, "chunk_max"),
    ({"reveal_min": 0.7}, "reveal_min"),
    ({"reveal_max": 1.2}, "reveal_max"),
    ({"free_tail": -1}, "free_tail"),
    ({"stretch_max": 0.9}, "stretch_max"),
    ({"max_spacing": -3}, "max_spacing"),
    ({"chunk_min": True}, "chunk_min"),
    ({"exclude_answer": 1}, "exclude_answer"),
])
def test_settings_reject_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HintSettings(**kwargs)


def test_settings_defaults_are_the_papers():
    s = HintSettings()
    assert (s.chunk_min, s.chunk_max, s.reveal_min, s.reveal_max, s.free_tail) == (5, 10, 0.2, 0.6, 30)
    assert s.exclude_answer and not s.released_variant and s.stretch_max == 1.5


# ---- the reference trace, final answer excluded -----------------------------------------------

@pytest.mark.parametrize("solution, answer, expected", [
    ("Tom has 5 apples and gets 7 more, so 5+7=12.\n#### 12", "12", "Tom has 5 apples and gets 7 more, so 5+7=12."),
    ("Add 5 and 7: 5 + 7 = 12.\nThe answer is: 12", "12", "Add 5 and 7: 5 + 7 = 12."),
    ("We add 5 and 7. The answer is $\\boxed{12}$.", "12", "We add 5 and 7. The answer is ."),
    ("Half of it: $x = \\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", "Half of it: $x = $"),
    ("Unclosed \\boxed{\\frac{1}{2}", "\\frac{1}{2}", "Unclosed"),
    ("Adding them gives 12.", "12", "Adding them gives"),
    ("So the total is $12$.\n", "12", "So the total is"),
    ("There are 112", "12", "There are 112"),  # 12 is glued to a digit: not the stated answer
    ("12 is what we start from, then add 3.", "15", "12 is what we start from, then add 3."),
])
def test_strip_final_answer(solution, answer, expected):
    assert strip_final_answer(solution, answer) == expected


def test_marker_keeps_the_reasoning_that_computes_the_answer():
    # With "####" present, the answer's last mention inside the reasoning is not an answer statement.
    assert strip_final_answer("so 5+7=12\n#### 12", "12") == "so 5+7=12"


@pytest.mark.parametrize("solution", [
    "Put the 5 apples with the 7 apples and count them.\n#### 12",
    "Put the 5 apples with the 7 apples and count them: $\\boxed{12}$",
    "Put the 5 apples with the 7 apples and count them to get 12.",
])
def test_answer_tokens_never_reach_the_hints(solution):
    tok = CharTokenizer()
    answer_ids = {ord("1"), ord("2")}  # the answer's only digits, appearing only in the final answer
    reveal_all = HintSettings(reveal_min=1.0, reveal_max=1.0, free_tail=0)
    kept = reasoning_token_ids(solution, "12", tok, exclude_answer=True)
    assert kept == [ord(c) for c in solution[:len(kept)]]  # a prefix of the solution, untouched
    hints = build_hints(kept, 500, 5, random.Random(0), reveal_all)
    assert all(set(h.values()) == set(kept) for h in hints)  # everything else was revealed
    assert not answer_ids & set(kept)
    full = reasoning_token_ids(solution, "12", tok, exclude_answer=False)
    assert full == [ord(c) for c in solution] and answer_ids <= set(full)


def test_empty_text_gives_no_tokens():
    assert reasoning_token_ids("#### 12", "12", CharTokenizer(), exclude_answer=True) == []


# ---- chunks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_min, chunk_max", [(5, 10), (1, 1), (3, 3), (2, 7)])
def test_chunks_cover_the_trace_exactly_with_sizes_in_bounds(chunk_min, chunk_max):
    sizes_seen = set()
    for seed in range(300):
        rng = random.Random(seed)
        n = rng.randrange(0, 80)
        spans = chunk_spans(n, rng, chunk_min, chunk_max)
        assert [s for s, _ in spans] == [0, *(e for _, e in spans)][:len(spans)]  # consecutive from 0
        assert (spans[-1][1] if spans else 0) == n  # nothing left over
        for i, (s, e) in enumerate(spans):
            size = e - s
            assert 1 <= size <= chunk_max
            if i < len(spans) - 1:
                assert size >= chunk_min
                sizes_seen.add(size)
    assert sizes_seen == set(range(chunk_min, chunk_max + 1))  # every size is drawn


def test_chunk_spans_rejects_bad_bounds():
    with pytest.raises(ValueError, match="chunk_min=0, chunk_max=3"):
        chunk_spans(10, random.Random(0), 0, 3)
    with pytest.raises(ValueError, match="chunk_min=4, chunk_max=3"):
        chunk_spans(10, random.Random(0), 4, 3)


# ---- hints (paper variant) ----------------------------------------------------------------------

def test_hint_tokens_sit_at_their_trace_positions_in_whole_chunks():
    settings = HintSettings()
    for seed in range(200):
        rng = random.Random(seed)
        trace = [rng.randrange(50_000) for _ in range(rng.randrange(0, 150))]
        answer_length = rng.randrange(0, 200)
        hint_area = max(0, answer_length - settings.free_tail)
        for hint in build_hints(trace, answer_length, 4, rng, settings):
            assert all(hint[p] == trace[p] for p in hint)
            assert all(0 <= p < hint_area for p in hint)  # never in the free tail
            shown = min(len(trace), hint_area)
            if shown == 0:
                assert not hint
            # The paper's floor(eta * chunks): a trace of at least 5 chunks (eta >= 0.2) always shows one.
            if shown >= 5 * settings.chunk_max:
                assert hint
            for first, last in runs(hint):
                assert last - first + 1 >= settings.chunk_min or last == shown - 1


def test_no_hints_when_the_answer_is_all_free_tail_or_the_trace_is_empty():
    rng = random.Random(0)
    assert build_hints(distinct_trace(100), 30, 3, rng, HintSettings()) == [{}, {}, {}]
    assert build_hints([], 256, 2, rng, HintSettings()) == [{}, {}]
    assert build_hints(distinct_trace(100), 256, 0, rng, HintSettings()) == []


def test_revealed_fraction_stays_in_range_and_averages_the_middle():
    # Fixed-size chunks make the chunks known: [0, 5), [5, 10), ... so the count is hint size / 5.
    settings = HintSettings(chunk_min=5, chunk_max=5, reveal_min=0.2, reveal_max=0.6, free_tail=0)
    n_chunks = 40
    rng = random.Random(1)
    fractions = []
    for hint in build_hints(distinct_trace(5 * n_chunks), 5 * n_chunks, 2000, rng, settings):
        revealed = {p // 5 for p in hint}
        assert len(hint) == 5 * len(revealed)  # whole chunks only
        k = len(revealed)
        assert round(0.2 * n_chunks) <= k <= round(0.6 * n_chunks)
        fractions.append(k / n_chunks)
    # floor(eta * n) drops half a chunk on average: E = 0.4 - 0.5 / n.
    assert abs(sum(fractions) / len(fractions) - (0.4 - 0.5 / n_chunks)) < 0.005
    assert min(fractions) <= 0.21 and max(fractions) >= 0.57  # the whole range is used


def test_every_chunk_is_sometimes_revealed_and_sometimes_hidden():
    settings = HintSettings(chunk_min=5, chunk_max=5, free_tail=0)
    hints = build_hints(distinct_trace(100), 100, 500, random.Random(2), settings)
    shown = [sum(1 for h in hints if 5 * c in h) for c in range(20)]
    assert all(50 < s < 450 for s in shown)


def test_revealed_chunk_count_rules():
    assert revealed_chunk_count(0, 0.5, False) == 0
    assert revealed_chunk_count(3, 0.01, False) == 0  # the paper's floor: a short trace may get no hint
    assert revealed_chunk_count(10, 0.44, False) == 4
    assert revealed_chunk_count(10, 0.46, False) == 4  # floor, not round
    assert revealed_chunk_count(5, 0.6, False) == 3  # 0.6 * 5 = 2.9999999999999996 in floats
    assert revealed_chunk_count(10, 1.0, False) == 10
    assert revealed_chunk_count(10, 0.44, True) == 10 - int(10 * 0.56)  # released: masks floor((1-eta) n)
    assert revealed_chunk_count(7, 0.2, True) == 2


def test_same_seed_same_hints():
    trace = distinct_trace(120)
    a = build_hints(trace, 256, 8, random.Random(5), HintSettings())
    b = build_hints(trace, 256, 8, random.Random(5), HintSettings())
    assert a == b and len({tuple(sorted(h)) for h in a}) > 1  # reproducible, yet varied across samples


# ---- hints (released variant) -------------------------------------------------------------------

def reference_stretched_layout(revealed, stretch, max_spacing):
    """The released layout written out: first at int(start*s), then gap int(gap*s) capped."""
    placed = []
    for start, end in revealed:
        if not placed:
            new_start = int(start * stretch)
        else:
            (prev_start, prev_end), prev_new_start = placed[-1]
            new_start = prev_new_start + (prev_end - prev_start) + min(int((start - prev_end) * stretch), max_spacing)
        placed.append(((start, end), new_start))
    return placed


@pytest.mark.parametrize("trace_len, answer_length, max_spacing", [
    (62, 130, 100),   # room to stretch: 100 / 62 -> 1.5 cap
    (80, 130, 100),   # stretch 100 / 80 = 1.25
    (62, 130, 4),     # gaps capped
    (200, 130, 100),  # trace longer than the hint area: no stretch, cut
])
def test_released_variant_layout_and_last_chunk(trace_len, answer_length, max_spacing):
    settings = HintSettings(chunk_min=5, chunk_max=5, released_variant=True, max_spacing=max_spacing)
    hint_area = answer_length - settings.free_tail
    shown = min(trace_len, hint_area)
    chunks = [(s, s + 5) for s in range(0, shown - shown % 5, 5)]  # a remainder < 5 is dropped
    stretch = min(1.5, max(1.0, hint_area / trace_len))
    for hint in build_hints(distinct_trace(trace_len), answer_length, 300, random.Random(3), settings):
        trace_indices = sorted(v - 1000 for v in hint.values())
        revealed = sorted({chunks[j // 5] for j in trace_indices})
        assert chunks[-1] in revealed  # the last chunk, always
        assert all(j < chunks[-1][1] for j in trace_indices)  # the short remainder, never
        expected = {}
        for (start, end), new_start in reference_stretched_layout(revealed, stretch, max_spacing):
            for offset in range(end - start):
                if new_start + offset < hint_area:
                    expected[new_start + offset] = 1000 + start + offset
        assert hint == expected


def test_released_variant_reveals_more_than_eta_alone():
    # With eta at its minimum the forced last chunk often adds one beyond the drawn count.
    settings = HintSettings(chunk_min=5, chunk_max=5, reveal_min=0.2, reveal_max=0.2, free_tail=0, released_variant=True)
    counts = {len(h) // 5 for h in build_hints(distinct_trace(50), 200, 200, random.Random(4), settings)}
    assert counts == {2, 3}  # 10 - int(10 * 0.8) = 2 drawn, plus the last when not drawn


# ---- group replacement --------------------------------------------------------------------------

def test_is_all_wrong():
    assert is_all_wrong([False] * 8)
    assert not is_all_wrong([False] * 7 + [True])
    assert not is_all_wrong([])


def test_replacement_plan_properties():
    rng = random.Random(6)
    for _ in range(2000):
        g = rng.randint(1, 12)
        group = [rng.random() < 0.1 for _ in range(g)]
        inpainted = [rng.random() < rng.random() for _ in range(rng.randint(0, 12))]
        fraction = rng.choice([0.0, 0.25, 0.29, 0.5, 0.7, 1.0, rng.random()])
        plan = plan_replacements(group, inpainted, fraction)
        if any(group):
            assert plan == []
            continue
        limit = math.floor(Fraction(str(fraction)) * g)
        assert len(plan) == min(limit, sum(inpainted))  # as many as allowed and available
        slots = [s for s, _ in plan]
        donors = [d for _, d in plan]
        assert len(set(slots)) == len(slots) and len(set(donors)) == len(donors)
        assert all(not group[s] for s in slots) and all(inpainted[d] for d in donors)


def test_replacement_counts_without_float_noise():
    assert len(plan_replacements([False] * 100, [True] * 100, 0.29)) == 29  # 0.29 * 100 < 29 in floats
    assert len(plan_replacements([False] * 8, [True] * 8, 0.5)) == 4  # the paper: lambda 0.5, G 8
    assert plan_replacements([False] * 8, [False, True, False, True], 0.5) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match=r"max_fraction must be in \[0, 1\], got 1.5"):
        plan_replacements([False], [True], 1.5)


# ---- entropy filter on hint positions -----------------------------------------------------------

def reference_hint_loss_mask(entropy, hint_mask, completion_mask, keep_fraction):
    out = torch.zeros_like(completion_mask)
    for b in range(entropy.shape[0]):
        hints = []
        for t in range(entropy.shape[1]):
            if completion_mask[b, t] > 0 and hint_mask[b, t] > 0:
                hints.append(t)
            elif completion_mask[b, t] > 0:
                out[b, t] = 1
        keep = max(1, math.floor(Fraction(str(keep_fraction)) * len(hints)))
        for t in sorted(hints, key=lambda t: (-entropy[b, t].item(), t))[:keep]:
            out[b, t] = 1
    return out


def random_rows(seed, batch=6, length=23):
    g = torch.Generator().manual_seed(seed)
    entropy = torch.randint(0, 4, (batch, length), generator=g).float() / 2  # few values: many ties
    completion = torch.zeros(batch, length)
    hints = (torch.rand(batch, length, generator=g) < 0.5).float()
    for b in range(batch):
        completion[b, : int(torch.randint(0, length + 1, (1,), generator=g))] = 1  # right padding
    hints[0] = 0  # a row without hints
    hints[1] = 0
    hints[1, 0] = 1  # a row with a single hint
    completion[1, :5] = 1
    return entropy, hints, completion


@pytest.mark.parametrize("keep_fraction", [0.2, 0.29, 0.5, 0.01, 0.7, 1.0])
@pytest.mark.parametrize("seed", range(5))
def test_hint_loss_mask_matches_loop_reference(keep_fraction, seed):
    entropy, hints, completion = random_rows(seed)
    got = hint_loss_mask(entropy, hints, completion, keep_fraction)
    assert got.dtype == completion.dtype
    torch.testing.assert_close(got, reference_hint_loss_mask(entropy, hints, completion, keep_fraction))


def test_hint_loss_mask_keep_all_and_at_least_one():
    entropy, hints, completion = random_rows(9)
    torch.testing.assert_close(hint_loss_mask(entropy, hints, completion, 1.0), completion)
    got = hint_loss_mask(entropy, hints, completion, 0.01)
    n_hints = ((hints > 0) & (completion > 0)).sum(-1)
    kept_hints = (got * hints).sum(-1)
    assert torch.equal(kept_hints, (n_hints > 0).float())


def test_hint_loss_mask_floor_count_and_ties():
    # 7 hints at tau 0.2: the released rule keeps max(1, int(1.4)) = 1 (a ceil would keep 2).
    entropy = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.2, 0.3, 0.4, 7.0, 0.0]])
    hints = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 0, 0]])
    completion = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 1, 0]])
    got = hint_loss_mask(entropy, hints, completion, 0.2)
    # the tie at 0.9 goes to the earlier position; the high-entropy non-hint stays; padding is 0
    assert got.tolist() == [[0.0, 1, 0, 0, 0, 0, 0, 1, 0]]
    assert hint_loss_mask(entropy, hints, completion, 0.3).tolist() == [[0.0, 1, 1, 0, 0, 0, 0, 1, 0]]


def test_hint_loss_mask_rejects_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"keep_fraction must be in \(0, 1\], got 0.0"):
        hint_loss_mask(x, x, x, 0.0)
    with pytest.raises(ValueError, match=r"must share one \[B, T\] shape, got \(2, 3\), \(2, 3\), \(2, 4\)"):
        hint_loss_mask(x, x, torch.zeros(2, 4), 0.5)
