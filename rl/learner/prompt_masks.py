"""d1's fresh prompt mask for each inner update of a masked-diffusion GRPO step.

d1 (arXiv 2504.12216, dllm-reasoning/d1 diffu_grpo_trainer.py) masks a random 15% of the prompt in
the one-step log-prob estimator and draws a new mask seed for each of its mu inner iterations; the
old-policy and reference log-probs of iteration j are computed, before any update of the step,
under iteration j's mask, so each ratio compares two estimates under one mask. The variation
across iterations is the regulariser its mu = 12 relies on.

Here the mask of a row is a function of its tokens and a `mask_seed` (rollouts.diffusion.prompt_mask);
inner update j uses mask_seed j. Update 0's log-probs are the batch's own (the engines report
mask_seed 0 too, so mismatch metrics and the weight-sync check compare like with like); this
module computes those of updates 1..mu-1 up front and swaps them in for each update.
"""
from __future__ import annotations

from rl.core.batch import SequenceBatch
from rollouts.diffusion import MASK_SEED_FIELD

# Token fields that are log-probs of the pre-update models, hence depend on the prompt mask.
MASK_DEPENDENT_FIELDS = ("old_logprobs", "ref_logprobs")


class PromptMaskSchedule:
    """Per-update mask seeds and the mask-dependent fields scored under them."""

    def __init__(self, batch: SequenceBatch, learners, temperature: float, updates: int):
        self.batch, self.per_update = batch, [{name: batch.token_fields[name] for name in self._fields(batch)}]
        for update in range(1, updates):
            self._set_seed(update)
            fields = {}
            if "ref_logprobs" in batch.token_fields:
                fields["ref_logprobs"], _ = learners.compute_logprobs(batch, temperature, reference=True)
            if "old_logprobs" in batch.token_fields:
                fields["old_logprobs"], _ = learners.compute_logprobs(batch, temperature)
            self.per_update.append(fields)
        self.use(0)

    @staticmethod
    def _fields(batch: SequenceBatch) -> list[str]:
        return [name for name in MASK_DEPENDENT_FIELDS if name in batch.token_fields]

    def _set_seed(self, update: int) -> None:
        self.batch.seq_fields[MASK_SEED_FIELD] = [float(update)] * len(self.batch)

    def use(self, update: int) -> None:
        """Make the batch train inner update `update`: its mask seed and its log-probs."""
        self._set_seed(update)
        self.batch.token_fields.update(self.per_update[update])


def prompt_mask_schedule(batch: SequenceBatch, learners, temperature: float, updates: int, diffusion):
    """A PromptMaskSchedule when a masked-diffusion model (`diffusion`: the learner's
    DiffusionForward, None for causal models) masks prompts and there is more than one inner
    update, else None."""
    if diffusion is None or diffusion.prompt_mask_prob <= 0 or updates <= 1:
        return None
    return PromptMaskSchedule(batch, learners, temperature, updates)
