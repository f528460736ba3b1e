"""diffu-GRPO (d1, arXiv 2504.12216): GRPO for masked-diffusion LLMs, on the one-step
log-probability estimator (the learner's masked-diffusion forward), with d1's random prompt masking.

It also counts the groups whose responses are all wrong (zero advantage, no gradient), before and
after repair, under IGPO's metric names: diffu-GRPO is the baseline IGPO (rl/algorithms/igpo.py)
repairs those groups against, and the two runs' curves compare key for key.
"""
from __future__ import annotations

import dataclasses

from typing import Literal

from pydantic import Field, field_validator

from rl.algorithms.base import Learner, Repair, Requirements, Rollouts, SampledRound, Update, register_algorithm
from rl.algorithms.grpo import GRPO, GRPOConfig, with_token_fields
from rl.algorithms.inpainting import is_all_wrong
from rl.core.batch import SequenceBatch
from rl.core.schema import Section
from rl.core.types import SamplingSpec
from rollouts.diffusion import MASK_SEED_FIELD

REPAIR_COUNTS = ("groups", "all_wrong_before", "all_wrong_after", "inpainted", "inpainted_correct", "replaced", "no_reference")


class EstimatorChoice(Section):
    """Which likelihood estimator scores a masked-diffusion policy (diffu_grpo, igpo; opsd with a
    diffusion student, whose teacher is scored through the same passes)."""

    estimator: str = Field(
        "one_step",
        description="The likelihood estimator (rollouts.estimators, by name): one_step, d1's (one forward, "
        "every answer position masked; the paper recipes'); mc_elbo, LLaDA's ELBO by Monte Carlo (VRPO, "
        "SPG); coupled, DiffuCoder's complementary masks. The diffusion engine's reported log-probs and "
        "`score` and the learner's training forward compute the same one with the same random draws "
        "(rollouts.estimators.rows.row_generator). mc_elbo runs estimator_samples forwards per micro-batch, "
        "coupled 2 x estimator_samples + 1, each keeping its activations for the backward.",
    )
    estimator_samples: int = Field(
        1, ge=1, description="n: random masks (mc_elbo) or mask pairs (coupled) averaged; one_step ignores it."
    )

    @field_validator("estimator")
    @classmethod
    def _known_estimator(cls, name: str) -> str:
        from rollouts.estimators import ESTIMATORS

        if name not in ESTIMATORS:
            raise ValueError(f"Unknown estimator {name!r}; registered: {', '.join(sorted(ESTIMATORS))}.")
        return name


class DiffuGRPOConfig(GRPOConfig, EstimatorChoice):
    """GRPO's options, on a likelihood estimator of a masked-diffusion model (d1's one-step by default)."""

    prompt_mask_prob: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Mask each prompt token with this probability in the one-step estimator's forward "
        "(d1's 0.15, a regulariser for mu > 1; IGPO's paper drops it: 0). Applied alike wherever the "
        "estimator runs (learner, the diffusion engine's reported log-probs and `score`), with a fresh "
        "mask for each inner update as d1 draws (DiffuGRPO.update): the old-policy and reference "
        "log-probs of update j are scored under update j's mask before the step.",
    )
    loss_support: Literal["through_eos", "whole_answer"] = Field(
        "through_eos",
        description="Which answer positions are trained: through_eos, the tokens up to and including the "
        "first EOS (d1's completion_mask); whole_answer, every one of the rollout.max_tokens answer "
        "positions, the EOS padding after the first EOS included (the IGPO release's loss mask, "
        "trainer_igpo.py masked_token_mask). The reward always reads the text through the first EOS.",
    )


@register_algorithm
class DiffuGRPO(GRPO):
    name = "diffu_grpo"
    Config = DiffuGRPOConfig

    def __init__(self, cfg):
        if cfg.model.kind != "masked_diffusion":
            raise ValueError(
                f"algorithm={cfg.algorithm} trains masked-diffusion models; set model.kind=masked_diffusion "
                "and rollout.engine=diffusion (or use algorithm=grpo for a causal model)."
            )
        super().__init__(cfg)

    def _requirements(self) -> Requirements:
        return dataclasses.replace(super()._requirements(), prompt_mask_prob=self.cfg.prompt_mask_prob,
                                   estimator=self.cfg.estimator, estimator_samples=self.cfg.estimator_samples)


    def update(self, batch: SequenceBatch, learner: Learner) -> Update:
        """d1's prompt masking (arXiv 2504.12216, dllm-reasoning/d1 diffu_grpo_trainer.py): a fresh
        prompt mask for each of the mu inner updates, whose old-policy and reference log-probs are
        scored under that mask before any update, so that each ratio compares two estimates under one
        mask. Update j uses mask seed j (rollouts.diffusion.prompt_mask); update 0's log-probs are the
        batch's own, as the engines report them, and its batch is the one the weight-sync check
        re-scores."""
        mu = self.cfg.updates_per_batch
        if self.cfg.prompt_mask_prob <= 0 or mu <= 1:
            return super().update(batch, learner)
        batches = [_with_mask_seed(batch, 0)]
        for update in range(1, mu):
            masked = _with_mask_seed(batch, update)
            fields = {}
            if "ref_logprobs" in batch.token_fields:
                fields["ref_logprobs"], _ = learner.score(masked, reference=True)
            if "old_logprobs" in batch.token_fields:
                fields["old_logprobs"], _ = learner.score(masked)
            batches.append(with_token_fields(masked, **fields))
        for masked in batches:
            train_metrics = learner.train(masked, self.loss)
        return Update(train_metrics, {}, batches[0])
    def sampling_spec(self) -> SamplingSpec:
        return dataclasses.replace(super().sampling_spec(), keep_after_eos=self.cfg.loss_support == "whole_answer")

    def loss_temperature(self) -> float:
        # The one-step estimator is read at temperature 1, as the engines report it: the sampling
        # temperature shapes the diffusion sampler's choices, not a per-token distribution.
        return 1.0

    def needs_correctness(self) -> str | None:
        return "the all-wrong group counts igpo/all_wrong_fraction_*"

    def repair_groups(self, sampled: SampledRound, generate, score) -> Repair:
        all_wrong = sum(is_all_wrong(correct) for correct in sampled.correct)
        counts = dict.fromkeys(REPAIR_COUNTS, 0)
        counts.update(groups=len(sampled.rows), all_wrong_before=all_wrong, all_wrong_after=all_wrong)
        return Repair(sampled, [], counts)

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        batch, metrics = super().build_batch(rollouts)
        counts = {key: rollouts.repair_counts.get(key, 0) for key in REPAIR_COUNTS}
        groups = max(counts["groups"], 1)
        metrics.update({
            "igpo/all_wrong_fraction_before": counts["all_wrong_before"] / groups,
            "igpo/all_wrong_fraction_after": counts["all_wrong_after"] / groups,
            "igpo/replaced": counts["replaced"],
            "igpo/inpainted": counts["inpainted"],
            "igpo/inpainted_accuracy": counts["inpainted_correct"] / max(counts["inpainted"], 1),
            "igpo/groups_without_reference": counts["no_reference"],
            "igpo/hint_tokens": float(sum(sum(c.hint_mask) for group in rollouts.completions for c in group
                                          if c.hint_mask is not None)),
        })
        return batch, metrics


def _with_mask_seed(batch: SequenceBatch, seed: int) -> SequenceBatch:
    return dataclasses.replace(batch, seq_fields={**batch.seq_fields, MASK_SEED_FIELD: [float(seed)] * len(batch)})
