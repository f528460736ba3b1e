"""Loss math: pure functions over tensors and masks, no framework state.

Shapes: per-token tensors are [B, T] (B completions, T completion positions), `mask` is 1.0 on
valid completion tokens and 0.0 on padding.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

# The one list of loss aggregations and KL estimators: config sections type their options with these.
Aggregation = Literal["token_mean", "seq_mean_token_mean", "sum_constant", "group_token_mean"]
KLKind = Literal["k1", "k2", "k3"]
AGGREGATIONS = get_args(Aggregation)
KL_KINDS = get_args(KLKind)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probabilities."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        # exp(ref - logp) - (ref - logp) - 1: unbiased and non-negative (Schulman, 2020).
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"Unknown KL estimator {kind!r}; choose one of {KL_KINDS}.")


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A) and whether it clipped."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, (clipped < unclipped).float()


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """This batch's share of a loss aggregated over the WHOLE step.

    `normalizer` comes from `step_normalizer` over every sequence of the optimizer step, so that
    summing this over micro-batches and ranks gives exactly the full-batch aggregate:
      token_mean:          sum(values * mask) / total valid tokens of the step
      seq_mean_token_mean: sum_i (token-mean of sequence i) / sequences of the step
      sum_constant:        sum(values * mask) / constant
      group_token_mean:    sum_g (token-mean over group g's loss tokens) / groups of the step (the
                           IGPO and d1 releases: a micro-batch is one group, loss = its token mean,
                           averaged over micro-batches); `weights` [B, T] is 1 / (loss tokens of the
                           token's group), from `group_token_weights`, so a group split over
                           micro-batches or ranks still counts once.
    """
    if mode in ("token_mean", "sum_constant"):
        return (values * mask).sum() / normalizer
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_seq.sum() / normalizer
    if mode == "group_token_mean":
        if weights is None:
            raise ValueError("group_token_mean aggregation needs the per-token group weights (group_token_weights).")
        return (values * mask * weights).sum() / normalizer
    raise ValueError(f"Unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}.")


def group_token_weights(loss_masks: list[list[float]], group_sizes: list[int]) -> list[list[float]]:
    """group_token_mean's per-token weights: 1 / (the loss tokens of the token's group), for the
    step's sequences in order (`loss_masks`, one row per sequence) cut into consecutive groups of
    `group_sizes`. A group without loss tokens gets weight 0 (it adds nothing, as in the releases,
    whose zero-token micro-batch loss is 0)."""
    if sum(group_sizes) != len(loss_masks):
        raise ValueError(f"group sizes {group_sizes} do not cover the {len(loss_masks)} sequences.")
    weights, start = [], 0
    for size in group_sizes:
        rows = loss_masks[start : start + size]
        tokens = sum(sum(row) for row in rows)
        weights += [[1.0 / tokens if tokens > 0 else 0.0] * len(row) for row in rows]
        start += size
    return weights


def step_normalizer(completion_lens: list[int], mode: str, constant: float | None = None,
                    groups: int | None = None) -> float:
    """The denominator `aggregate` needs, from the lengths of all completions of the step
    (group_token_mean: the number of groups of the step, `groups`)."""
    if mode == "group_token_mean":
        if groups is None:
            raise ValueError("group_token_mean aggregation needs the step's number of groups.")
        return float(max(groups, 1))
    if mode == "token_mean":
        return float(max(sum(completion_lens), 1))
    if mode == "seq_mean_token_mean":
        return float(max(len(completion_lens), 1))
    if mode == "sum_constant":
        if constant is None:
            raise ValueError("sum_constant aggregation needs a constant (e.g. max_tokens x sequences).")
        return float(constant)
    raise ValueError(f"Unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}.")


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token log-ratio of each sequence, [B, T] -> [B, 1]: one importance ratio per sequence
    (exp of it), the length-normalised form a sequence-level clip needs."""
    return ((logp - old_logp) * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, level: str,
                         cap: float) -> torch.Tensor:
    """Importance weights correcting for the engine sampling from a slightly different policy than
    the learner's, from r = pi_learner / pi_engine per token or per sequence (the product over its
    tokens): `token` / `sequence` truncate, min(r, cap) (TIS); `token_mask` / `sequence_mask` mask,
    r where r <= cap and 0 beyond (TRL's vllm_importance_sampling_mode of those names, MIS)."""
    ratio = importance_ratios(old_logp, rollout_logp, mask, level)
    weights = ratio.clamp(max=cap) if level in ("token", "sequence") else ratio * (ratio <= cap)
    return weights * mask


def importance_ratios(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """r = pi_learner / pi_engine, untruncated: [B, T] per token, or [B, 1] per sequence (the product
    over its tokens) for the sequence levels."""
    log_ratio = (old_logp - rollout_logp) * mask
    if level in ("sequence", "sequence_mask"):
        log_ratio = log_ratio.sum(dim=1, keepdim=True)
    elif level not in ("token", "token_mask"):
        raise ValueError(f"Unknown importance-sampling level {level!r}; choose token, sequence, token_mask or sequence_mask.")
    return torch.exp(log_ratio)
