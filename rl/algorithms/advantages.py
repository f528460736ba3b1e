"""Advantage estimators by name: pure functions of a step's rewards, grouped contiguously.

`fn(rewards [N], group_size) -> advantages [N]`, where rewards[k*G:(k+1)*G] are one prompt's group.
Select one with `<algorithm section>.advantage=<name>`; add one with @register_advantage(name) in
the file that defines your algorithm.
"""
from __future__ import annotations

import torch

from rl.core.registry import Registry

ADVANTAGES = Registry("advantage estimator")
register_advantage, get_advantage = ADVANTAGES.register, ADVANTAGES.lookup


@register_advantage("group_mean")
def group_mean(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i - mean(group) (Dr. GRPO, arXiv 2503.20783: no division by the std)."""
    grouped = rewards.view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)


@register_advantage("group_mean_std")
def group_mean_std(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean(group)) / (std(group) + eps): the original GRPO (DeepSeekMath, arXiv 2402.03300),
    with the unbiased std of its implementation (torch.std's default)."""
    grouped = rewards.view(-1, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    return (adv / (grouped.std(dim=1, keepdim=True) + eps)).reshape(-1)


@register_advantage("rloo")
def rloo(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al., arXiv 2402.14740):
    A_i = r_i - mean of the OTHER G-1 rewards of the group, a baseline independent of sample i."""
    if group_size < 2:
        raise ValueError("RLOO needs at least two samples per group (group_size >= 2) for a leave-one-out baseline.")
    grouped = rewards.view(-1, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1)
