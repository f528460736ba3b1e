"""OPSD divergences against plain references written here: loops over positions and vocabulary entries."""
import math

import pytest
import torch

from rl.algorithms import divergences
from rl.algorithms.divergences import chunked_divergence, divergence, sampled_token_loss
from rl.algorithms.losses import AGGREGATIONS

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]
CLIP = 0.05  # per-entry terms of the random logits below straddle it: some capped, some not


def log_softmax_by_hand(row):
    top = max(row)
    log_z = top + torch.log(sum(torch.exp(x - top) for x in row))
    return [x - log_z for x in row]


def reference_entries(student_row, teacher_row, kind, beta, temperature, clip):
    """The per-entry terms of one position, written out; a capped entry becomes the constant `clip`."""
    logp_s = log_softmax_by_hand([x / temperature for x in student_row])
    logp_t = log_softmax_by_hand([x.detach() / temperature for x in teacher_row])
    terms = []
    for ls, lt in zip(logp_s, logp_t):
        ps, pt = torch.exp(ls), torch.exp(lt)
        if kind == "forward_kl":
            term = pt * (lt - ls)
        elif kind == "reverse_kl":
            term = ps * (ls - lt)
        else:
            m = beta * pt + (1 - beta) * ps
            term = beta * pt * torch.log(pt / m) + (1 - beta) * ps * torch.log(ps / m)
        terms.append(torch.tensor(clip, dtype=term.dtype) if clip is not None and term.item() > clip else term)
    return terms


def reference_divergence(student, teacher, kind, beta=0.5, temperature=1.0, clip=None, top_k=None):
    """[..., V] -> [...], position by position; top-k picks the teacher's k largest logits by sorting."""
    flat_s, flat_t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    out = []
    for s_row, t_row in zip(flat_s, flat_t):
        entries = range(len(s_row))
        if top_k is not None:
            entries = sorted(entries, key=lambda v: -t_row[v].item())[:top_k]
        terms = reference_entries(
            [s_row[v] for v in entries], [t_row[v] for v in entries],
            kind, beta, temperature, clip,
        )
        out.append(sum(terms))
    return torch.stack(out).reshape(student.shape[:-1])


def random_logits(*shape, requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2).requires_grad_(requires_grad)


def value_and_grad(fn, *inputs):
    """Value of fn(*inputs) and the gradient of a non-uniform weighting of it w.r.t. each input."""
    value = fn(*inputs)
    weights = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype).reshape(value.shape)
    grads = torch.autograd.grad((value * weights).sum(), inputs, allow_unused=True)
    return value.detach(), grads


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("clip", [None, CLIP])
@pytest.mark.parametrize("temperature", [1.0, 1.1])
@pytest.mark.parametrize("top_k", [None, 4])
def test_divergence_matches_reference(kind, beta, clip, temperature, top_k):
    student, teacher = random_logits(2, 3, 7, seed=1), random_logits(2, 3, 7, seed=2)
    opts = dict(kind=kind, beta=beta, temperature=temperature, clip=clip, top_k=top_k)
    got, (grad, teacher_grad) = value_and_grad(lambda s, t: divergence(s, t, **opts), student, teacher)
    want, (want_grad, _) = value_and_grad(lambda s, t: reference_divergence(s, t, **opts), student, teacher)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)
    assert teacher_grad is None
    if clip is not None:
        unclipped = divergence(student, teacher, kind=kind, beta=beta, temperature=temperature, top_k=top_k)
        assert (got < unclipped.detach()).any(), "the clip must bite for this test to mean anything"


@pytest.mark.parametrize("kind,beta", KINDS)
def test_capped_entries_carry_no_gradient(kind, beta):
    student, teacher = random_logits(4, 7, seed=3), random_logits(4, 7, seed=4)
    terms = torch.stack([torch.stack(reference_entries(s, t, kind, beta, 1.0, None)) for s, t in zip(student, teacher)])
    capped = terms.detach() > CLIP
    assert 0 < capped.sum() < capped.numel()
    # Only the uncapped entries' terms, summed by hand: the capped ones must add nothing but the constant.
    by_hand = torch.where(capped, torch.full_like(terms, CLIP), terms).sum(-1)
    want_grad, = torch.autograd.grad(torch.where(capped, torch.zeros_like(terms), terms).sum(), student)
    for fn in (divergence, lambda s, t, **kw: chunked_divergence(s, t, None, chunk_size=3, **kw)):
        value = fn(student, teacher, kind=kind, beta=beta, clip=CLIP)
        grad, = torch.autograd.grad(value.sum(), student)
        torch.testing.assert_close(value, by_hand)
        torch.testing.assert_close(grad, want_grad)


def test_everything_capped_gives_constant_negative_loss_and_zero_gradient():
    student, teacher = random_logits(3, 5, seed=5), random_logits(3, 5, seed=6)
    for fn in (divergence, lambda s, t, **kw: chunked_divergence(s, t, None, chunk_size=2, **kw)):
        value = fn(student, teacher, clip=-1.0)
        grad, = torch.autograd.grad(value.sum(), student)
        torch.testing.assert_close(value, torch.full((3,), -5.0, dtype=torch.float64))
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("clip", [None, CLIP])
@pytest.mark.parametrize("top_k", [None, 4])
def test_chunked_hidden_states_match_full_logits(kind, beta, clip, top_k):
    """Value and gradients w.r.t. student hidden states and the shared lm_head, with a mask."""
    n, hidden, vocab = 11, 5, 13
    student_h, weight = random_logits(n, hidden, seed=7), random_logits(vocab, hidden, seed=8)
    teacher_h = random_logits(n, hidden, seed=9)  # requires grad: must get none anyway
    mask = torch.ones(n, dtype=torch.float64)
    mask[[2, 7, 8]] = 0.0
    opts = dict(kind=kind, beta=beta, temperature=1.1, clip=clip, top_k=top_k)

    def full(s, w, t):
        return divergence(s @ w.T, t @ w.T, **opts) * mask

    def chunked(s, w, t):
        return chunked_divergence(s, t, w, mask, chunk_size=3, **opts)

    want, want_grads = value_and_grad(full, student_h, weight, teacher_h)
    got, grads = value_and_grad(chunked, student_h, weight, teacher_h)
    torch.testing.assert_close(got, want)
    assert torch.all(got[[2, 7, 8]] == 0)
    torch.testing.assert_close(grads[0], want_grads[0])
    torch.testing.assert_close(grads[1], want_grads[1])
    assert grads[2] is None


def test_chunked_with_separate_teacher_head_and_batch_shape():
    """A frozen teacher copy has its own lm_head, which gets no gradient; [B, T, H] in, [B, T] out."""
    student_h, teacher_h = random_logits(2, 4, 5, seed=10), random_logits(2, 4, 5, seed=11)
    weight, teacher_weight = random_logits(9, 5, seed=12), random_logits(9, 5, seed=13)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    got, grads = value_and_grad(
        lambda s, w, tw: chunked_divergence(s, teacher_h, w, mask, teacher_lm_head_weight=tw, chunk_size=2),
        student_h, weight, teacher_weight,
    )
    want, want_grads = value_and_grad(
        lambda s, w, tw: divergence(s @ w.T, teacher_h @ tw.T) * mask, student_h, weight, teacher_weight
    )
    assert got.shape == (2, 4)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads[0], want_grads[0])
    torch.testing.assert_close(grads[1], want_grads[1])
    assert grads[2] is None


@pytest.mark.parametrize("kind,beta", KINDS)
def test_chunked_logits_input_matches_reference(kind, beta):
    student, teacher = random_logits(2, 5, 7, seed=14), random_logits(2, 5, 7, seed=15)
    opts = dict(kind=kind, beta=beta, temperature=1.1, clip=CLIP)
    got, (grad,) = value_and_grad(lambda s: chunked_divergence(s, teacher, None, chunk_size=4, **opts), student)
    want, (want_grad,) = value_and_grad(lambda s: reference_divergence(s, teacher, **opts), student)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


def test_chunked_frozen_head_and_low_precision():
    """LoRA: the head needs no gradient; bf16 inputs are upcast, so values track the fp64 ones."""
    student_h, teacher_h = random_logits(6, 8, seed=16), random_logits(6, 8, seed=17, requires_grad=False)
    weight = random_logits(50, 8, seed=18, requires_grad=False)
    got = chunked_divergence(student_h.bfloat16(), teacher_h.bfloat16(), weight.bfloat16(), chunk_size=4)
    grad, = torch.autograd.grad(got.sum(), student_h)
    assert got.dtype == torch.float32
    want = divergence(student_h.bfloat16().double() @ weight.bfloat16().double().T,
                      teacher_h.bfloat16().double() @ weight.bfloat16().double().T)
    torch.testing.assert_close(got.double(), want.detach(), rtol=0.05, atol=0.05)
    assert grad.dtype == torch.float64 and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_chunked_graph_holds_nothing_of_size_positions_times_vocab():
    n, hidden, vocab = 64, 4, 1000
    student_h, weight = random_logits(n, hidden, seed=19), random_logits(vocab, hidden, seed=20)
    teacher_h = random_logits(n, hidden, seed=21, requires_grad=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked = chunked_divergence(student_h, teacher_h, weight, chunk_size=8).sum()
    assert max(saved) <= vocab * hidden
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        naive = divergence(student_h @ weight.T, teacher_h @ weight.T).sum()
    assert max(saved) >= n * vocab  # the check above would catch a naive graph
    torch.testing.assert_close(chunked, naive)


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("top_k", [None, 3])
def test_identical_teacher_and_student_give_zero(kind, beta, top_k):
    logits = random_logits(3, 4, 9, seed=22)
    for value in (divergence(logits, logits.detach(), kind=kind, beta=beta, temperature=1.1, top_k=top_k),
                  chunked_divergence(logits, logits.detach(), None, kind=kind, beta=beta, top_k=top_k, chunk_size=5)):
        grad, = torch.autograd.grad(value.sum(), logits)
        torch.testing.assert_close(value, torch.zeros_like(value))
        torch.testing.assert_close(grad, torch.zeros_like(grad))


def test_top_k_renormalises_over_the_teachers_top_entries():
    student, teacher = random_logits(4, 8, seed=23), random_logits(4, 8, seed=24)
    got = divergence(student, teacher, top_k=3)
    # By hand for row 0: the teacher's three largest logits, both distributions renormalised there.
    top = sorted(range(8), key=lambda v: -teacher[0, v].item())[:3]
    p_t = torch.softmax(teacher[0, top].detach(), -1)
    p_s = torch.softmax(student[0, top].detach(), -1)
    torch.testing.assert_close(got[0].detach(), (p_t * (p_t / p_s).log()).sum())
    torch.testing.assert_close(got, reference_divergence(student, teacher, "forward_kl", top_k=3))
    assert not torch.allclose(got, divergence(student, teacher))


def test_sampled_token_loss_value_and_gradient():
    student_logits, teacher_logits = random_logits(2, 5, 6, seed=25), random_logits(2, 5, 6, seed=26)
    tokens = torch.randint(0, 6, (2, 5), generator=torch.Generator().manual_seed(0))
    lp_s = torch.log_softmax(student_logits / 1.1, -1).gather(-1, tokens[..., None]).squeeze(-1)
    lp_t = torch.log_softmax(teacher_logits / 1.1, -1).gather(-1, tokens[..., None]).squeeze(-1).detach()
    loss = sampled_token_loss(lp_s, lp_t)
    grad, = torch.autograd.grad(loss.sum(), lp_s)
    torch.testing.assert_close(loss, -(lp_t - lp_s) * lp_s)
    # The advantage is a constant: d/d lp_s is -(lp_t - lp_s), not -(lp_t - 2 lp_s).
    torch.testing.assert_close(grad, -(lp_t - lp_s).detach())


def test_forward_kl_known_value():
    """Two-entry distributions in closed form, temperature included: logits/T = log(p)."""
    p_t, p_s, temperature = torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5]), 2.0
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    got = divergence(p_s.log() * temperature, p_t.log() * temperature, temperature=temperature)
    assert got.item() == pytest.approx(kl, rel=1e-6)


def test_rejects_unknown_kind_and_degenerate_beta():
    x = random_logits(2, 3)
    with pytest.raises(ValueError, match="Unknown divergence"):
        divergence(x, x, kind="tv")
    for beta in (0.0, 1.0):
        with pytest.raises(ValueError, match="0 < beta < 1"):
            chunked_divergence(x, x, None, kind="jsd", beta=beta)


def test_aggregation_mapping_names_losses_modes():
    assert set(divergences.AGGREGATION.values()) <= set(AGGREGATIONS)
