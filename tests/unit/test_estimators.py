"""The likelihood estimators against brute force: on a tiny model with a 4-token answer, the
expectation of each random estimator is computed exactly by enumerating all 16 masks (the t
integrals by Gauss-Legendre, exact for these polynomials), and the Monte Carlo mean must match it;
the variance must fall with n; one_step must be today's one_step_logprobs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from rollouts.diffusion import answer_layout, one_step_logprobs
from rollouts.estimators import ESTIMATORS, get_estimator
from rollouts.estimators.common import answer_logprobs, with_answer

V, MASK, PAD, T = 12, 11, 0, 4


class Toy:
    """Bidirectional stand-in whose logits at a position depend on every attended token (so the
    log-probs depend on which answer tokens are masked), in float64."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.randn(V, 8, generator=g, dtype=torch.float64)
        self.pos = torch.randn(64, 8, generator=g, dtype=torch.float64)
        self.mix = torch.randn(8, 8, generator=g, dtype=torch.float64)
        self.out = torch.randn(8, V, generator=g, dtype=torch.float64) * 1.5

    def __call__(self, ids, attention):
        e = self.emb[ids] * attention[..., None]
        context = torch.tanh(e.sum(1, keepdim=True) @ self.mix) / attention.sum(1, keepdim=True)[..., None]
        return (e + 2 * context + self.pos[: ids.shape[1]]) @ self.out


PROMPTS, ANSWERS = [[3, 4, 5], [1, 2]], [[5, 6, 7, 8], [9, 1, 2, 3]]


def layout(repeat=1):
    prompts, answers = PROMPTS * repeat, ANSWERS * repeat
    ids, attention, positions = answer_layout(prompts, T, PAD, MASK)
    return ids, attention, positions, torch.tensor(answers)


def masked_logprobs(model, mask_set):
    """[2, T] log p(answer | the answer masked at mask_set) for the two base rows."""
    ids, attention, positions, answers = layout()
    masked = torch.zeros((2, T), dtype=torch.bool)
    masked[:, list(mask_set)] = True
    return answer_logprobs(model, with_answer(ids, positions, answers, masked, MASK), attention, positions, answers, 1.0)


def t_average(f, low, high, points=30):
    """(1 / (high - low)) * integral of f(t) over [low, high] by Gauss-Legendre."""
    x, w = np.polynomial.legendre.leggauss(points)
    t = (high - low) / 2 * x + (high + low) / 2
    return float(np.sum(w * f(t)) / 2)


def exact_mc_elbo(model, eps):
    terms = torch.zeros((2, T), dtype=torch.float64)
    for m in range(1, T + 1):
        c = t_average(lambda t: t ** (m - 1) * (1 - t) ** (T - m), eps, 1.0)
        for mask_set in itertools.combinations(range(T), m):
            lp = masked_logprobs(model, mask_set)
            for k in mask_set:
                terms[:, k] += c * lp[:, k]
    return terms


def exact_coupled(model, weighting, low=0.2, high=0.8):
    terms = torch.zeros((2, T), dtype=torch.float64)
    for m in range(0, T + 1):
        for mask_set in itertools.combinations(range(T), m):
            complement = tuple(k for k in range(T) if k not in mask_set)
            lp_m, lp_c = masked_logprobs(model, mask_set), masked_logprobs(model, complement)
            if weighting == "diffucoder":  # P(M | t) / t for k in M, P(M | t) / (1 - t) for k in M^c
                a = t_average(lambda t: t ** (m - 1) * (1 - t) ** (T - m), low, high) if m else 0.0
                b = t_average(lambda t: t ** m * (1 - t) ** (T - m - 1), low, high) if m < T else 0.0
            else:
                a = b = t_average(lambda t: t ** m * (1 - t) ** (T - m), low, high)
            for k in range(T):
                terms[:, k] += a * lp_m[:, k] if k in mask_set else b * lp_c[:, k]
    if weighting == "plain":
        return terms
    return (masked_logprobs(model, range(T)) + terms) / 2


def draws(name, model, repeat, n, seed, **kw):
    """[repeat, 2, T] independent estimates (each row of the batch draws its own masks)."""
    ids, attention, positions, answers = layout(repeat)
    est = get_estimator(name)(model, ids, attention, positions, answers, mask_id=MASK, n=n,
                              generator=torch.Generator().manual_seed(seed), **kw)
    return est.view(repeat, 2, T)


def test_registry():
    assert {"one_step", "mc_elbo", "coupled"} <= set(ESTIMATORS)
    with pytest.raises(KeyError, match="registered"):
        get_estimator("nope")


def test_one_step_is_todays_estimator():
    model = Toy(1)
    ids, attention, positions, answers = layout()
    want = one_step_logprobs(model(ids, attention), positions, answers, temperature=0.7)
    garbage = ids.clone()
    garbage[torch.arange(2)[:, None], positions] = answers  # whatever ids hold at the answer is ignored
    got = get_estimator("one_step")(model, garbage, attention, positions, answers, mask_id=MASK, temperature=0.7)
    assert torch.allclose(got, want.double(), atol=1e-6)


@pytest.mark.parametrize("name,kw,exact", [
    ("mc_elbo", {"eps": 0.05}, lambda m: exact_mc_elbo(m, 0.05)),
    ("mc_elbo", {}, lambda m: exact_mc_elbo(m, 1e-3)),
    ("coupled", {}, lambda m: exact_coupled(m, "diffucoder")),
    ("coupled", {"weighting": "plain"}, lambda m: exact_coupled(m, "plain")),
])
def test_monte_carlo_mean_matches_the_enumeration(name, kw, exact):
    model = Toy(2)
    want = exact(model)
    est = draws(name, model, repeat=3000, n=1, seed=0, **kw)
    mean, se = est.mean(0), est.std(0) / est.shape[0] ** 0.5
    # Per token and for the sequence sums: within 4.5 standard errors (deterministic seed).
    assert ((mean - want).abs() <= 4.5 * se + 1e-9).all(), (mean, want, se)
    seq = est.sum(-1)
    assert ((seq.mean(0) - want.sum(-1)).abs() <= 4.5 * seq.std(0) / seq.shape[0] ** 0.5).all()


@pytest.mark.parametrize("name,kw", [("mc_elbo", {"eps": 0.05}), ("coupled", {}), ("coupled", {"weighting": "plain"})])
def test_variance_falls_with_n(name, kw):
    model = Toy(3)
    var = {}
    for n in (1, 4, 16):
        seq = draws(name, model, repeat=600, n=n, seed=n, **kw).sum(-1)  # [repeat, 2]
        var[n] = seq.var(0)
    assert (var[4] < var[1] / 2).all() and (var[16] < var[4] / 2).all(), var
    # and close to 1/n: between a third and three times the ideal ratio
    ratio = var[1] / var[16]
    assert ((ratio > 16 / 3) & (ratio < 48)).all(), ratio


def test_estimators_are_reproducible_with_the_generator():
    model = Toy(4)
    for name in ("mc_elbo", "coupled"):
        a, b = draws(name, model, 2, 3, seed=9), draws(name, model, 2, 3, seed=9)
        assert torch.equal(a, b)
