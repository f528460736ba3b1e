"""GRPO: group sampling, group-relative advantages, clipped surrogate, optional KL to a reference,
plus the options practitioners run it with: 80/20 entropy filtering, DAPO dynamic sampling and
overlong filtering, truncated importance-sampling correction of the engine/learner mismatch."""
from __future__ import annotations

import torch

from rl.algorithms import losses
from rl.algorithms.base import Algorithm, Rollouts, register_algorithm
from rl.learner.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.algorithms.entropy import chunked_entropy, top_entropy_mask
from rollouts.types import SamplingSpec


def _padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(max((len(r) for r in rows), default=0), 1)
    values, mask = torch.zeros(len(rows), width), torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        mask[i, : len(r)] = 1.0
    return values, mask


@register_algorithm("grpo")
class GRPO(Algorithm):
    def __init__(self, cfg):
        self.cfg = cfg.grpo
        self.rollout_cfg = cfg.rollout
        self.needs_reference = self.cfg.kl_coef > 0
        self.updates_per_batch = self.cfg.updates_per_batch
        self.max_sampling_rounds = self.cfg.max_sampling_rounds if self.cfg.dynamic_sampling else 1
        self.wants_entropy = self.cfg.entropy_top_fraction is not None
        # Scores needed BEFORE the loss: old log-probs for mu > 1, the entropy filter, IS weights.
        self.needs_policy_scores = (
            self.updates_per_batch > 1 or self.wants_entropy or self.cfg.importance_sampling != "off"
        )
        # The mismatch statistics alone can wait: at mu = 1 the training forward's own log-probs
        # are the current policy's, so no extra forward is spent on them.
        self.policy_scores_from_training = self.cfg.track_mismatch and not self.needs_policy_scores

    def loss_temperature(self) -> float:
        return self.rollout_cfg.temperature

    def sampling_spec(self) -> SamplingSpec:
        r = self.rollout_cfg
        return SamplingSpec(
            n=self.cfg.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens
        )

    def keep_group(self, rewards: list[float]) -> bool:
        # An all-equal group has zero advantage everywhere: no gradient, only cost.
        return not self.cfg.dynamic_sampling or max(rewards) > min(rewards)

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        g = self.cfg.group_size
        rewards = torch.tensor([r for group in rollouts.rewards for r in group], dtype=torch.float32)
        advantages = losses.group_advantages(rewards, g, self.cfg.normalize_std).tolist()
        completions = [c for group in rollouts.completions for c in group]
        prompts = [p for p, group in zip(rollouts.prompt_ids, rollouts.completions) for _ in group]
        trained = [not (self.cfg.overlong_filter and c.truncated) for c in completions]
        lens = [len(c.token_ids) for c in completions]
        kept_lens = [n for n, keep in zip(lens, trained) if keep]
        constant = self.cfg.loss_constant or float(self.rollout_cfg.max_tokens * len(lens))
        batch = SequenceBatch(
            input_ids=[list(p) + list(c.token_ids) for p, c in zip(prompts, completions)],
            prompt_lens=[len(p) for p in prompts],
            token_fields={
                "advantages": [[a] * n for a, n in zip(advantages, lens)],
                "rollout_logprobs": [list(c.logprobs) for c in completions],
                "loss_mask": [[float(keep)] * n for keep, n in zip(trained, lens)],
            },
            loss_normalizer=losses.step_normalizer(kept_lens or [0], self.cfg.loss_agg, constant),
        )
        metrics = {
            "zero_advantage_fraction": (rewards.view(-1, g).std(dim=1) == 0).float().mean().item(),
            "overlong_filtered_fraction": 1.0 - sum(trained) / len(trained),
        }
        return batch, metrics

    def use_policy_scores(self, batch: SequenceBatch, logprobs, entropies) -> dict[str, float]:
        """Current-policy scores before the update: old logprobs, the entropy filter, mismatch stats."""
        if self.updates_per_batch > 1:
            batch.token_fields["old_logprobs"] = logprobs
        metrics = {}
        if self.cfg.entropy_top_fraction is not None:
            entropy, mask = _padded(entropies)
            keep = top_entropy_mask(entropy, mask, self.cfg.entropy_top_fraction, self.cfg.entropy_scope)
            batch.token_fields["pg_mask"] = [keep[i, : len(r)].tolist() for i, r in enumerate(entropies)]
            metrics["entropy_filter_kept_fraction"] = float(keep.sum() / mask.sum())
        learner_lp, mask = _padded(logprobs)
        rollout_lp, _ = _padded(batch.token_fields["rollout_logprobs"])
        gap = (learner_lp - rollout_lp).abs() * mask
        metrics["mismatch/logprob_gap_mean"] = float(gap.sum() / mask.sum())
        metrics["mismatch/logprob_gap_max"] = float(gap.max())
        weights = losses.truncated_is_weights(learner_lp, rollout_lp, mask, "token", self.cfg.importance_cap)
        metrics["mismatch/is_weight_mean"] = float(weights.sum() / mask.sum())
        return metrics

    def loss(self, out: PolicyOutputs, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        c, fields = self.cfg, mb.token_fields
        mask = mb.completion_mask * fields["loss_mask"] if "loss_mask" in fields else mb.completion_mask
        logp = losses.chunked_token_logprobs(out.hidden, out.lm_head_weight, mb.completion_ids, out.temperature, c.chunk_size)
        out.keep_logprobs(logp)
        # With one update per batch the data is on-policy: old = current (detached), ratio == 1.
        old = fields.get("old_logprobs", logp.detach())
        # A sequence-level ratio enters the same clipped surrogate as old + mean log-ratio at every token.
        ratio_logp = logp if c.ratio_level == "token" else old + losses.sequence_log_ratio(logp, old, mask)
        per_token, clipped = losses.clipped_surrogate(ratio_logp, old, fields["advantages"], c.clip_low, c.clip_high)
        if "pg_mask" in fields:
            per_token = per_token * fields["pg_mask"]
        if c.importance_sampling != "off":
            per_token = per_token * losses.truncated_is_weights(
                old, fields["rollout_logprobs"], mask, c.importance_sampling, c.importance_cap
            )
        metrics = {}
        if self.needs_reference:
            kl = losses.kl_penalty(logp, fields["ref_logprobs"], c.kl_kind)
            per_token = per_token + c.kl_coef * kl
            metrics["kl_sum"] = float((kl.detach() * mask).sum())
        loss = losses.aggregate(per_token, mask, c.loss_agg, mb.loss_normalizer)
        weight = None if out.lm_head_weight is None else out.lm_head_weight.detach()
        entropy = chunked_entropy(out.hidden.detach(), weight, mask, out.temperature, c.chunk_size)
        metrics["entropy_sum"] = float((entropy * mask).sum())
        metrics["clip_fraction_sum"] = float((clipped * mask).sum())
        metrics["tokens"] = float(mask.sum())
        return loss, metrics
