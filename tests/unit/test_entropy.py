"""Chunked entropy against the direct formula; the top-entropy filter against a sort-based reference."""
import math
from fractions import Fraction

import pytest
import torch

from rl.algorithms.entropy import chunked_entropy, keep_counts, top_entropy_mask


def naive_entropy(logits, temperature):
    p = torch.softmax(logits / temperature, dim=-1)
    return -(p * p.log()).sum(-1)


def reference_filter(entropy, mask, fraction, scope):
    """Sort (entropy descending, position ascending) over each scope's valid positions; keep the first ceil(f*n)."""
    keep = torch.zeros_like(mask)
    groups = [list(range(entropy.numel()))] if scope == "batch" else [
        [r * entropy.shape[1] + c for c in range(entropy.shape[1])] for r in range(entropy.shape[0])
    ]
    flat_e, flat_m, flat_keep = entropy.reshape(-1), mask.reshape(-1), keep.view(-1)
    for group in groups:
        valid = [i for i in group if flat_m[i] > 0]
        ranked = sorted(valid, key=lambda i: (-flat_e[i].item(), i))
        k = math.ceil(Fraction(str(fraction)) * len(valid))  # exact decimal arithmetic
        for i in ranked[:k]:
            flat_keep[i] = 1.0
    return keep


@pytest.mark.parametrize("with_head", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_entropy_matches_naive(with_head, temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 6, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 7, generator=g) > 0.3).double()
    logits = hidden @ weight.T
    inputs = (hidden, weight) if with_head else (logits, None)
    got = chunked_entropy(*inputs, mask, temperature, chunk_size=4)
    assert got.shape == (3, 7) and not got.requires_grad
    torch.testing.assert_close(got, naive_entropy(logits, temperature).detach() * mask)
    torch.testing.assert_close(chunked_entropy(logits, None, temperature=temperature, chunk_size=5),
                               naive_entropy(logits, temperature).detach())


def test_chunked_entropy_upcasts_low_precision():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(10, 3000, generator=g) * 3
    got = chunked_entropy(logits.bfloat16(), None, chunk_size=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, naive_entropy(logits.bfloat16().float(), 1.0))


@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.7, 1.0, 0.01])
def test_filter_keeps_exactly_the_top_fraction(scope, fraction):
    g = torch.Generator().manual_seed(2)
    # Few distinct values so that ties are common and the tie rule is exercised.
    entropy = torch.randint(0, 4, (5, 10), generator=g).float() * 0.5
    mask = (torch.rand(5, 10, generator=g) > 0.3).float()
    mask[3] = 0.0  # a sequence with no valid token keeps nothing
    mask[4] = 0.0
    mask[4, 6] = 1.0  # a sequence with one valid token keeps it
    mask[0] = 1.0  # ten valid tokens: 0.7 must keep exactly 7
    got = top_entropy_mask(entropy, mask, fraction, scope)
    assert torch.equal(got, reference_filter(entropy, mask, fraction, scope))
    assert torch.all(got <= mask)
    if scope == "sequence":
        assert got[3].sum() == 0 and got[4, 6] == 1
        assert got[0].sum() == math.ceil(Fraction(str(fraction)) * 10)


def test_filter_ties_go_to_the_earlier_position():
    entropy = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.5]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]])
    assert top_entropy_mask(entropy, mask, 0.25).tolist() == [[0.0, 0.0, 1.0, 0.0, 0.0]]
    assert top_entropy_mask(entropy, mask, 0.5).tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0]]


def test_filter_batch_scope_ranks_across_sequences_and_any_shape():
    entropy = torch.tensor([[0.1, 0.2, 0.3], [5.0, 4.0, 0.0]])
    mask = torch.ones(2, 3)
    assert top_entropy_mask(entropy, mask, 0.3, "batch").tolist() == [[0, 0, 0], [1, 1, 0]]
    assert top_entropy_mask(entropy, mask, 0.3, "sequence").tolist() == [[0, 0, 1], [1, 0, 0]]
    flat = top_entropy_mask(entropy.reshape(-1), mask.reshape(-1), 0.3, "batch")
    assert flat.tolist() == [0, 0, 0, 1, 1, 0]


def test_keep_counts_rounding():
    counts = torch.tensor([0, 1, 3, 10, 10, 11])
    assert keep_counts(counts, 0.7).tolist() == [0, 1, 3, 7, 7, 8]
    assert keep_counts(counts, 0.2).tolist() == [0, 1, 1, 2, 2, 3]
    assert keep_counts(counts, 1.0).tolist() == counts.tolist()
    # Float products just above an integer must not add a token.
    assert keep_counts(torch.tensor([25, 50, 100]), 0.28).tolist() == [7, 14, 28]
    assert keep_counts(torch.tensor([100]), 0.07).tolist() == [7]
    # IGPO's hint count: floor, at least one.
    assert keep_counts(counts, 0.2, round_up=False).tolist() == [0, 1, 1, 2, 2, 2]
    assert keep_counts(torch.tensor([7, 25]), 0.28, round_up=False).tolist() == [1, 7]


def test_filter_rejects_bad_arguments():
    e, m = torch.rand(2, 3), torch.ones(2, 3)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            top_entropy_mask(e, m, fraction)
    with pytest.raises(ValueError, match="scope"):
        top_entropy_mask(e, m, 0.2, "token")
    with pytest.raises(ValueError, match="sequence"):
        top_entropy_mask(e.reshape(-1), m.reshape(-1), 0.2, "sequence")
