"""d1's one-step estimator (diffu-GRPO, arXiv 2504.12216): ONE forward with every answer position
masked; token k's term is log p(answer token k) read at answer position k. The same quantity as
`rollouts.diffusion.one_step_logprobs` on the engine's masked layout (the test checks it)."""
from __future__ import annotations

import torch

from rollouts.estimators.common import answer_logprobs, register_estimator, with_answer


@register_estimator("one_step")
def one_step(logits_fn, ids, attention, positions, answer_ids, *, mask_id: int, n: int = 1,
             generator: torch.Generator | None = None, temperature: float = 1.0) -> torch.Tensor:
    masked = torch.ones_like(answer_ids, dtype=torch.bool)
    return answer_logprobs(logits_fn, with_answer(ids, positions, answer_ids, masked, mask_id), attention,
                           positions, answer_ids, temperature)
