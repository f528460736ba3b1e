"""d1's one-step estimator (diffu-GRPO, arXiv 2504.12216): ONE forward with every answer position
masked; token k's term is log p(answer token k) read at answer position k. The same quantity as
`rollouts.diffusion.one_step_logprobs` on the engine's masked layout (the test checks it)."""
from __future__ import annotations

import torch

from rollouts.estimators.common import register_estimator


@register_estimator("one_step")
def one_step(B: int, T: int, *, n: int = 1, generator: torch.Generator | None = None, device=None):
    return [(torch.ones((B, T), dtype=torch.bool, device=device), torch.ones((B, T), dtype=torch.float64, device=device))]
