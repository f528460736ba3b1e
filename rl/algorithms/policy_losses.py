"""Policy losses by name: pure per-token functions of the policy's and the old policy's log-probs.

`fn(logp, old_logp, advantages, mask, clip_low, clip_high) -> (per-token loss [B, T], clipped [B, T])`;
all tensors [B, T], `mask` 1.0 on completion tokens. The caller aggregates (rl.algorithms.losses).
Select one with `<algorithm section>.policy_loss=<name>`; add one with @register_policy_loss(name).
"""
from __future__ import annotations

from typing import Callable

import torch

from rl.core.registry import Registry
from rl.algorithms.losses import clipped_surrogate, sequence_log_ratio

PolicyLossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
POLICY_LOSSES = Registry("policy loss")
register_policy_loss, get_policy_loss = POLICY_LOSSES.register, POLICY_LOSSES.lookup


@register_policy_loss("ppo_clip")
def ppo_clip(logp, old_logp, advantages, mask, clip_low: float, clip_high: float):
    """PPO's clipped surrogate with one importance ratio per token (PPO, GRPO, DAPO's clip-higher)."""
    return clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)


@register_policy_loss("gspo")
def gspo(logp, old_logp, advantages, mask, clip_low: float, clip_high: float):
    """GSPO (arXiv 2507.18071): one ratio per sequence, exp of its mean token log-ratio, clipped as a
    whole. Written as the token surrogate at old + mean log-ratio, so every token of a sequence
    carries the sequence's ratio and its gradient (IGPO's released configuration uses it too)."""
    return clipped_surrogate(old_logp + sequence_log_ratio(logp, old_logp, mask), old_logp, advantages, clip_low, clip_high)
