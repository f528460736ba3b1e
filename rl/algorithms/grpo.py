"""GRPO: group sampling, group-relative advantages, clipped surrogate, optional KL to a reference."""
from __future__ import annotations

import torch

from rl import losses
from rl.algorithms.base import Algorithm, Rollouts, register_algorithm
from rl.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rollouts.types import SamplingSpec


@register_algorithm("grpo")
class GRPO(Algorithm):
    def __init__(self, cfg):
        self.cfg = cfg.grpo
        self.rollout_cfg = cfg.rollout
        self.needs_reference = self.cfg.kl_coef > 0
        self.updates_per_batch = self.cfg.updates_per_batch
        self.needs_old_logprobs = self.updates_per_batch > 1

    def loss_temperature(self) -> float:
        return self.rollout_cfg.temperature

    def sampling_spec(self) -> SamplingSpec:
        r = self.rollout_cfg
        return SamplingSpec(
            n=self.cfg.group_size, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_tokens=r.max_tokens
        )

    def build_batch(self, rollouts: Rollouts) -> tuple[SequenceBatch, dict[str, float]]:
        g = self.cfg.group_size
        rewards = torch.tensor([r for group in rollouts.rewards for r in group], dtype=torch.float32)
        advantages = losses.group_advantages(rewards, g, self.cfg.normalize_std)
        input_ids, prompt_lens, adv_tokens = [], [], []
        for prompt, group in zip(rollouts.prompt_ids, rollouts.completions):
            for c in group:
                input_ids.append(list(prompt) + list(c.token_ids))
                prompt_lens.append(len(prompt))
        for (ids, p), a in zip(zip(input_ids, prompt_lens), advantages.tolist()):
            adv_tokens.append([a] * (len(ids) - p))
        lens = [len(x) - p for x, p in zip(input_ids, prompt_lens)]
        constant = self.cfg.loss_constant or float(self.rollout_cfg.max_tokens * len(lens))
        batch = SequenceBatch(
            input_ids=input_ids,
            prompt_lens=prompt_lens,
            token_fields={"advantages": adv_tokens},
            loss_normalizer=losses.step_normalizer(lens, self.cfg.loss_agg, constant),
        )
        zero_adv_groups = (rewards.view(-1, g).std(dim=1) == 0).float().mean().item()
        return batch, {"zero_advantage_fraction": zero_adv_groups}

    def loss(self, out: PolicyOutputs, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = mb.completion_mask
        logits = out.logits()
        logp = losses.token_logprobs(logits, mb.completion_ids)
        # With one update per batch the data is on-policy: old = current (detached), ratio == 1.
        old = mb.token_fields.get("old_logprobs", logp.detach())
        per_token, clipped = losses.clipped_surrogate(
            logp, old, mb.token_fields["advantages"], self.cfg.clip_low, self.cfg.clip_high
        )
        metrics = {}
        if self.needs_reference:
            kl = losses.kl_penalty(logp, mb.token_fields["ref_logprobs"], self.cfg.kl_kind)
            per_token = per_token + self.cfg.kl_coef * kl
            metrics["kl_sum"] = float((kl.detach() * mask).sum())
        loss = losses.aggregate(per_token, mask, self.cfg.loss_agg, mb.loss_normalizer)
        with torch.no_grad():
            metrics["entropy_sum"] = float((losses.token_entropy(logits) * mask).sum())
            metrics["clip_fraction_sum"] = float((clipped * mask).sum())
            metrics["tokens"] = float(mask.sum())
        return loss, metrics
