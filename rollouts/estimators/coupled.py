"""DiffuCoder's coupled-sampling estimator (coupled-GRPO, arXiv 2506.20639), as its code computes it
(apple/ml-diffucoder f735e01, src/open_r1/coupled_grpo.py: forward_process lines 254-279,
selective_log_softmax lines 59-125):

for each pair: t ~ U(0.2, 0.8) (`mask_ratio = random.uniform(0.2, 0.8)`), a uniform u_k per answer
token, mask M = {u_k < t} and its complement M^c, one forward for each, so every answer token is
scored exactly once per pair, in the pass where it is masked; plus one forward with the whole answer
masked (d1's one-step pass). Token k's term is

    ( log p_full(y^k) + w_k log p_{pass masking k}(y^k) ) / 2,   w_k = 1/t if k in M else 1/(1-t)

(`weighting="diffucoder"`, the default). `weighting="plain"` drops the full pass and the weights:
token k's term is log p(y^k) from the pass that masks it. With n pairs the pair terms are averaged
(the full pass is deterministic and computed once). DiffuCoder draws one t per batch; here each row
draws its own. The tests check both forms against the enumeration of every mask on a tiny model.
"""
from __future__ import annotations

import torch

from rollouts.estimators.common import register_estimator

LOW, HIGH = 0.2, 0.8
WEIGHTINGS = ("diffucoder", "plain")


@register_estimator("coupled")
def coupled(B: int, T: int, *, n: int = 1, generator: torch.Generator | None = None, device=None,
            weighting: str = "diffucoder", low: float = LOW, high: float = HIGH):
    if n < 1:
        raise ValueError(f"coupled needs n >= 1 mask pairs, got {n}.")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"coupled weighting must be one of {WEIGHTINGS}, got {weighting!r}.")
    # diffucoder: (full pass + the pairs' weighted mean) / 2; plain: the pairs' mean alone
    share = 1 / (2 * n) if weighting == "diffucoder" else 1 / n
    passes = []
    for _ in range(n):
        t = (low + (high - low) * torch.rand(B, dtype=torch.float64, generator=generator, device=device))[:, None]
        masked = torch.rand((B, T), dtype=torch.float64, generator=generator, device=device) < t
        if weighting == "diffucoder":
            passes += [(masked, share * masked / t), (~masked, share * ~masked / (1 - t))]
        else:
            passes += [(masked, share * masked.double()), (~masked, share * (~masked).double())]
    if weighting == "diffucoder":
        passes.append((torch.ones((B, T), dtype=torch.bool, device=device), torch.full((B, T), 0.5, dtype=torch.float64, device=device)))
    return passes
