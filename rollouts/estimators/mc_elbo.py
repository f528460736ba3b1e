"""LLaDA's evidence lower bound by Monte Carlo, the likelihood that LLaDA 1.5's VRPO
(arXiv 2505.19416, eq. for B_pi) and SPG (arXiv 2510.09541) estimate:

    ELBO(y | x) = E_{t ~ U(eps, 1)} E_{y_t ~ q(.|t, y)} [ (1/t) sum_k 1[y_t^k = M] log p(y^k | x, y_t) ]

where q masks each answer token independently with probability t. Exactly this form is
implemented: for each of `n` draws, per row, u ~ U[0, 1), t = eps + (1 - eps) u (LLaDA's
forward_process, `p_mask = (1 - eps) * t + eps`, eps 1e-3, from ML-GSAI/LLaDA's GUIDELINES.md),
each answer token masked iff its own uniform draw is < t, one forward, and token k's term is
1[k masked] log p(y^k | x, y_t) / t; the n draws are averaged. eps > 0 keeps the variance finite
(with t ~ U(0, 1] the 1/t weight has infinite variance); eps=0 gives t ~ U(0, 1].

Unbiased for the ELBO with that t law at any n; its variance falls as 1/n (tests/unit/
test_estimators.py checks both against the enumeration of every mask on a tiny model). VRPO's
other two ingredients, the budget split between timesteps and masks and the antithetic sharing of
t and masks between the policy and the reference model, are a caller's choice: call with the same
`generator` state for both models to share the draws.
"""
from __future__ import annotations

import torch

from rollouts.estimators.common import register_estimator

EPS = 1e-3


@register_estimator("mc_elbo")
def mc_elbo(B: int, T: int, *, n: int = 1, generator: torch.Generator | None = None, device=None, eps: float = EPS):
    if n < 1:
        raise ValueError(f"mc_elbo needs n >= 1 draws, got {n}.")
    passes = []
    for _ in range(n):
        t = eps + (1 - eps) * torch.rand(B, dtype=torch.float64, generator=generator, device=device)
        masked = torch.rand((B, T), dtype=torch.float64, generator=generator, device=device) < t[:, None]
        passes.append((masked, masked / t[:, None] / n))
    return passes
