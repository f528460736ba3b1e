"""GRPO: group sampling, group-relative advantages, clipped surrogate, optional KL to a reference,
plus the options practitioners run it with: 80/20 entropy filtering, DAPO dynamic sampling and
overlong filtering, truncated importance-sampling correction of the engine/learner mismatch.
The advantage estimator and the policy loss are picked by name from their registries."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from pydantic import Field, field_validator

from rl.algorithms import advantages, losses, policy_losses
from rl.core import contracts
from rl.algorithms.base import Algorithm, Learner, Requirements, Rollouts, Update, register_algorithm
from rl.algorithms.entropy import top_entropy_mask
from rl.algorithms.losses import Aggregation, KLKind
from rl.core.schema import Section
from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch, prompt_units
from rl.core.types import SamplingSpec


class GRPOConfig(Section):
    """GRPO (DeepSeekMath, arXiv 2402.03300) with the options practitioners run it with."""

    group_size: int = Field(8, ge=2, description="G completions per prompt [8 in DeepSeekMath/DAPO].")
    advantage: str = Field(
        "group_mean",
        description="Advantage estimator (rl.algorithms.advantages): group_mean (r - group mean; Dr. GRPO "
        "shows dividing by the std biases toward too-easy/too-hard questions), group_mean_std (the "
        "original GRPO), rloo (leave-one-out baseline), or one registered with @register_advantage.",
    )
    policy_loss: str = Field(
        "ppo_clip",
        description="Policy loss (rl.algorithms.policy_losses): ppo_clip (one importance ratio per token: "
        "PPO/GRPO and the IGPO paper), gspo (one ratio per sequence, exp of the mean token log-ratio, "
        "clipped as a whole: GSPO, and IGPO's released config), or one registered with @register_policy_loss.",
    )
    clip_low: float = Field(0.2, ge=0, description="PPO clip 1-eps_low [0.2].")
    clip_high: float = Field(0.28, ge=0, description="Clip-higher 1+eps_high [0.28, DAPO]; keeps exploration alive.")
    kl_coef: float = Field(0.0, ge=0, description="Weight of the KL to a frozen reference [0-0.04]; 0 skips the reference forward.")
    kl_kind: KLKind = Field("k3", description="KL estimator (Schulman's k1/k2/k3); k3 is unbiased and positive.")
    loss_agg: Aggregation = Field(
        "token_mean",
        description="token_mean: over all valid tokens of the step (DAPO); seq_mean_token_mean: "
        "original GRPO; sum_constant: token sum / constant (Dr. GRPO); group_token_mean: each group's "
        "token mean over its loss tokens, averaged over the step's groups (the IGPO and d1 releases, "
        "where a micro-batch is one group). Always global over the step.",
    )
    loss_constant: Optional[float] = Field(
        None, description="Denominator for sum_constant; None uses rollout.max_tokens x sequences."
    )
    updates_per_batch: int = Field(1, ge=1, description="mu: optimizer steps per rollout batch [1-4]; >1 needs an old-policy forward.")
    entropy_top_fraction: Optional[float] = Field(
        None,
        gt=0,
        le=1,
        description="Train the policy-gradient term only on this top fraction of response tokens by "
        "entropy under the current policy [0.2: the 80/20 paper, arXiv 2506.01939, where high-entropy "
        "'forking' tokens carry the learning signal]. None trains on every token. The KL term and the "
        "loss normaliser still cover every token: the filter removes gradient, it does not reweight.",
    )
    entropy_scope: Literal["batch", "sequence"] = Field(
        "batch", description="Rank tokens by entropy across the whole step's batch (the paper) or within each sequence."
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling (arXiv 2503.14476, eq. 11: keep a group when 0 < its number "
        "of right answers < G): drop groups whose answers are all right or all wrong by the "
        "correctness reward (reward.functions' correctness signal, required) and sample more prompts "
        "until prompts_per_step groups with signal are collected. The dropped groups' tokens still "
        "count in cumulative_rollout_tokens.",
    )
    max_sampling_rounds: int = Field(
        4, ge=1, description="Cap on generation rounds per step for dynamic sampling; a short batch trains as it is."
    )
    overlong_filter: bool = Field(
        False,
        description="DAPO's overlong filtering: truncated completions (finish_reason=length) are left "
        "out of the loss, so a cut-off answer is not punished as wrong. (The soft overlong penalty "
        "is the `overlong` reward.)",
    )
    importance_sampling: Literal["off", "token", "sequence", "token_mask", "sequence_mask"] = Field(
        "off",
        description="Importance-sampling correction of the training-inference mismatch: weight the "
        "policy-gradient term by r = pi_learner_old / pi_engine per token or per sequence, truncated "
        "as min(r, cap) (`token`, `sequence`: verl/Fengyao's TIS) or masked as r below the cap and 0 "
        "above it (`token_mask`, `sequence_mask`: TRL's modes of those names, whose GRPOTrainer applies "
        "sequence_mask with cap 3 by default, so the OPSD release's GRPO ran it). Needs a learner forward before the update. With "
        "rollout.top_p < 1 or rollout.top_k > 0 the weights are biased below 1 and cannot be fixed "
        "by a weight: the engine samples from (and reports log-probs of) the truncated, renormalised "
        "distribution q, the learner scores the full one pi, so pi/q on every sampled token is at "
        "most the kept mass (E_q[pi/q] = the nucleus mass < 1), and tokens outside the nucleus are "
        "never sampled. The correction then shrinks the gradient by about the nucleus mass instead "
        "of removing the engine-learner mismatch; use it with top_p=1, top_k=-1.",
    )
    importance_cap: float = Field(2.0, gt=0, description="C of the truncated importance weight [about 2].")
    track_mismatch: bool = Field(
        True,
        description="Log the rollout-vs-learner logprob gap of each step's sampled tokens (mean, max, "
        "and the mean importance weight). Free at updates_per_batch=1 without a filter (read from the "
        "training forward itself); otherwise from the no-grad forward those options need anyway. The mismatch "
        "it shows is what silently biases training when engines and learner disagree.",
    )
    chunk_size: int = Field(512, ge=1, description="Positions per chunk for logprobs and entropy over the vocabulary.")

    @field_validator("advantage", "policy_loss")
    @classmethod
    def _registered(cls, name: str, info) -> str:
        registry = advantages.ADVANTAGES if info.field_name == "advantage" else policy_losses.POLICY_LOSSES
        try:
            registry.lookup(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return name

def padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged per-token rows -> (values [B, T], mask [B, T]), zero-padded."""
    width = max(max((len(r) for r in rows), default=0), 1)
    values, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1.0
    return values, mask


def with_token_fields(batch: SequenceBatch, **fields) -> SequenceBatch:
    """A copy of `batch` with these token fields set (the others shared, not copied)."""
    return dataclasses.replace(batch, token_fields={**batch.token_fields, **fields})


@dataclass(frozen=True)
class PolicyGradientLoss:
    """The loss the learner runs: a policy loss over advantages, optional truncated importance
    weights and KL to the reference, aggregated over the step. Only options: pickled every step."""

    policy_loss: policy_losses.PolicyLossFn
    clip_low: float
    clip_high: float
    kl_coef: float
    kl_kind: str
    loss_agg: str
    importance_sampling: str
    importance_cap: float
    chunk_size: int

    @classmethod
    def from_config(cls, c: GRPOConfig) -> "PolicyGradientLoss":
        return cls(policy_loss=policy_losses.get_policy_loss(c.policy_loss), clip_low=c.clip_low, clip_high=c.clip_high,
                   kl_coef=c.kl_coef, kl_kind=c.kl_kind, loss_agg=c.loss_agg, importance_sampling=c.importance_sampling,
                   importance_cap=c.importance_cap, chunk_size=c.chunk_size)

    def __call__(self, out: PolicyOutputs, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        fields = mb.token_fields
        mask = mb.completion_mask * fields[contracts.LOSS_MASK] if contracts.LOSS_MASK in fields else mb.completion_mask
        # Padding skipped; the entropy metric comes from the same logits (no lm_head product of its own).
        logp, entropy = out.token_logprobs_and_entropy(mb.completion_ids, mb.completion_mask, self.chunk_size)
        out.keep_logprobs(logp)
        # With one update per batch the data is on-policy: old = current (detached), ratio == 1.
        old = fields.get("old_logprobs", logp.detach())
        # A sequence-level ratio (gspo) spans the whole completion, as GSPO's |y_i| and the IGPO
        # release's (trainer_igpo.py:655-658: all answer positions, hints included); the loss mask
        # only decides which tokens carry the loss.
        per_token, clipped = self.policy_loss(logp, old, fields[contracts.ADVANTAGES], mb.completion_mask, self.clip_low, self.clip_high)
        if "pg_mask" in fields:
            per_token = per_token * fields["pg_mask"]
        if self.importance_sampling != "off":
            per_token = per_token * losses.truncated_is_weights(
                old, fields["rollout_logprobs"], mask, self.importance_sampling, self.importance_cap
            )
        metrics = {}
        if self.kl_coef > 0:
            kl = losses.kl_penalty(logp, fields["ref_logprobs"], self.kl_kind)
            per_token = per_token + self.kl_coef * kl
            metrics["kl_sum"] = float((kl.detach() * mask).sum())
        loss = losses.aggregate(per_token, mask, self.loss_agg, mb.loss_normalizer, fields.get("loss_weight"))
        metrics["entropy_sum"] = float((entropy * mask).sum())
        metrics["clip_fraction_sum"] = float((clipped * mask).sum())
        metrics["tokens"] = float(mask.sum())
        return loss, metrics


@register_algorithm
class GRPO(Algorithm):
    name = "grpo"
    Config = GRPOConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rollout_cfg = cfg.rollout
        self.requirements = self._requirements()
        self.loss = PolicyGradientLoss.from_config(self.cfg)

    def _requirements(self) -> Requirements:
        c = self.cfg
        return Requirements(
            reference=c.kl_coef > 0,
            updates_per_batch=c.updates_per_batch,
            sampling_rounds=c.max_sampling_rounds if c.dynamic_sampling else 1,
        )

    def _scores_before_update(self) -> bool:
        """Whether the loss needs the current policy's scores before the first update: old
        log-probs for mu > 1, the entropy filter, importance weights."""
        c = self.cfg
        return c.updates_per_batch > 1 or self._entropy_before_update() or c.importance_sampling != "off"

    def _entropy_before_update(self) -> bool:
        return self.cfg.entropy_top_fraction is not None

    def provides(self) -> set[str]:
        return {contracts.ADVANTAGES, contracts.LOSS_MASK, contracts.ENTROPY} | (
            {contracts.LOGPROB_GAP} if self.cfg.track_mismatch else set())

    def prepare(self, batch: SequenceBatch, learner: Learner) -> tuple[SequenceBatch, dict[str, float]]:
        if self.requirements.reference:
            ref_logprobs, _ = learner.score(batch, reference=True)
            batch = with_token_fields(batch, ref_logprobs=ref_logprobs)
        if not self._scores_before_update():
            return batch, {}
        return self.use_policy_scores(batch, *learner.score(batch, entropy=self._entropy_before_update()))

    def update(self, batch: SequenceBatch, learner: Learner) -> Update:
        if self._scores_before_update() or not self.cfg.track_mismatch:
            return super().update(batch, learner)
        # mu = 1 without a filter: the mismatch statistics need no forward of their own, the
        # training forward's log-probs are the current policy's (the loss keeps them).
        train_metrics, logprobs = learner.train(batch, self.loss, return_logprobs=True)
        return Update(train_metrics, self.mismatch_metrics(batch, logprobs), batch)

    def loss_temperature(self) -> float:
        return self.rollout_cfg.temperature

    def sampling_spec(self) -> SamplingSpec:
        r = self.rollout_cfg
        return SamplingSpec(
            n=self.cfg.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens
        )

    def needs_correctness(self) -> str | None:
        return "grpo.dynamic_sampling (DAPO keeps a group when some but not all of its answers are right)" if self.cfg.dynamic_sampling else None

    def keep_group(self, rewards: list[float], correct: list[bool]) -> bool:
        # An all-right or all-wrong group carries no signal on the answer, only cost.
        return not self.cfg.dynamic_sampling or 0 < sum(correct) < len(correct)

    def normalizer(self, kept_lens: list[int], sequences: int, groups: int | None = None) -> float:
        """The step's loss denominator over the completion lengths that stay in the loss."""
        constant = self.cfg.loss_constant or float(self.rollout_cfg.max_tokens * sequences)
        return losses.step_normalizer(kept_lens or [0], self.cfg.loss_agg, constant, groups)

    def with_group_weights(self, batch: SequenceBatch, group_sizes: list[int]) -> SequenceBatch:
        """loss_agg=group_token_mean: the per-token group weights and the group-count normaliser,
        from the batch's current loss_mask (call again whenever the loss mask changes)."""
        if self.cfg.loss_agg != "group_token_mean":
            return batch
        masks = batch.token_fields[contracts.LOSS_MASK]
        weights = losses.group_token_weights(masks, group_sizes)
        return dataclasses.replace(with_token_fields(batch, loss_weight=weights),
                                   loss_normalizer=self.normalizer([], len(masks), len(group_sizes)))

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        g = self.cfg.group_size
        rewards = torch.tensor([r for group in rollouts.rewards for r in group], dtype=torch.float32)
        advantage = advantages.get_advantage(self.cfg.advantage)(rewards, g).tolist()
        completions = [c for group in rollouts.completions for c in group]
        prompts = [p for p, group in zip(rollouts.prompt_ids, rollouts.completions) for _ in group]
        trained = [not (self.cfg.overlong_filter and c.truncated) for c in completions]
        lens = [len(c.token_ids) for c in completions]
        batch = SequenceBatch(
            input_ids=[list(p) + list(c.token_ids) for p, c in zip(prompts, completions)],
            prompt_lens=[len(p) for p in prompts],
            token_fields={
                contracts.ADVANTAGES: [[a] * n for a, n in zip(advantage, lens)],
                "rollout_logprobs": [list(c.logprobs) for c in completions],
                contracts.LOSS_MASK: [[float(keep)] * n for keep, n in zip(trained, lens)],
            },
            loss_normalizer=self.normalizer([n for n, keep in zip(lens, trained) if keep], len(lens), len(rollouts.completions)),
        )
        batch = self.with_group_weights(batch, [len(group) for group in rollouts.completions])
        metrics = {
            "zero_advantage_fraction": (rewards.view(-1, g).std(dim=1) == 0).float().mean().item(),
            "overlong_filtered_fraction": 1.0 - sum(trained) / len(trained),
        }
        return batch, metrics

    def use_policy_scores(self, batch: SequenceBatch, logprobs, entropies) -> tuple[SequenceBatch, dict[str, float]]:
        """The current policy's scores of the batch before any update: the fields the loss reads (old
        log-probs for mu > 1, the entropy filter's mask) as a new batch, and metrics."""
        fields, metrics = {}, self.mismatch_metrics(batch, logprobs)
        if self.cfg.updates_per_batch > 1:
            fields["old_logprobs"] = logprobs
        if self.cfg.entropy_top_fraction is not None:
            entropy, mask = padded(entropies)
            keep = top_entropy_mask(entropy, mask, self.cfg.entropy_top_fraction, self.cfg.entropy_scope)
            fields["pg_mask"] = [keep[i, : len(r)].tolist() for i, r in enumerate(entropies)]
            metrics["entropy_filter_kept_fraction"] = float(keep.sum() / mask.sum())
        return (with_token_fields(batch, **fields) if fields else batch), metrics

    def mismatch_metrics(self, batch: SequenceBatch, logprobs) -> dict[str, float]:
        """The engine-vs-learner log-prob gap of the sampled tokens (mean, max, worst prompt group)
        and the mean importance weight, from the learner's log-probs of the policy that sampled."""
        learner_lp, mask = padded(logprobs)
        rollout_lp, _ = padded(batch.token_fields["rollout_logprobs"])
        gap = (learner_lp - rollout_lp).abs() * mask
        weights = losses.truncated_is_weights(learner_lp, rollout_lp, mask, "token", self.cfg.importance_cap)
        # Where the correction acts: tokens whose ratio (at the configured level; token when off) is
        # beyond the cap, i.e. truncated (token, sequence) or dropped (the _mask levels).
        level = "token" if self.cfg.importance_sampling == "off" else self.cfg.importance_sampling
        beyond = (losses.importance_ratios(learner_lp, rollout_lp, mask, level) > self.cfg.importance_cap) * mask
        return {
            contracts.LOGPROB_GAP: float(gap.sum() / mask.sum()),
            contracts.LOGPROB_GAP_MAX: float(gap.max()),
            # The pool hands each engine whole prompts, so a prompt's group comes from one engine: the
            # worst group's mean shows one stale engine among many, which the batch mean dilutes.
            contracts.LOGPROB_GAP_GROUP: max(
                float(gap[unit].sum() / mask[unit].sum().clamp(min=1.0)) for unit in prompt_units(batch, share_prompt=True)
            ),
            "mismatch/is_weight_mean": float(weights.sum() / mask.sum()),
            "mismatch/is_capped_fraction": float(beyond.sum() / mask.sum()),
        }
