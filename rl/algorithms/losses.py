"""Loss math: pure functions over tensors and masks, no framework state.

Shapes: per-token tensors are [B, T] (B completions, T completion positions), `mask` is 1.0 on
valid completion tokens and 0.0 on padding.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch

# The one list of loss aggregations and KL estimators: config sections type their options with these.
Aggregation = Literal["token_mean", "seq_mean_token_mean", "sum_constant"]
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


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float) -> torch.Tensor:
    """This batch's share of a loss aggregated over the WHOLE step.

    `normalizer` comes from `step_normalizer` over every sequence of the optimizer step, so that
    summing this over micro-batches and ranks gives exactly the full-batch aggregate:
      token_mean:          sum(values * mask) / total valid tokens of the step
      seq_mean_token_mean: sum_i (token-mean of sequence i) / sequences of the step
      sum_constant:        sum(values * mask) / constant
    """
    if mode in ("token_mean", "sum_constant"):
        return (values * mask).sum() / normalizer
    if mode == "seq_mean_token_mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_seq.sum() / normalizer
    raise ValueError(f"Unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}.")


def step_normalizer(completion_lens: list[int], mode: str, constant: float | None = None) -> float:
    """The denominator `aggregate` needs, from the lengths of all completions of the step."""
    if mode == "token_mean":
        return float(max(sum(completion_lens), 1))
    if mode == "seq_mean_token_mean":
        return float(max(len(completion_lens), 1))
    if mode == "sum_constant":
        if constant is None:
            raise ValueError("sum_constant aggregation needs a constant (e.g. max_tokens x sequences).")
        return float(constant)
    raise ValueError(f"Unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}.")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[token] per position, [B, T, V] x [B, T] -> [B, T]."""
    # logsumexp + gather avoids materialising a second [B, T, V] tensor for log_softmax.
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)



def chunked_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor | None, tokens: torch.Tensor, temperature: float = 1.0, chunk_size: int = 512
) -> torch.Tensor:
    """log_softmax(hidden @ W^T / T)[token] per position, [B, T, H] -> [B, T], with gradients.

    Each chunk of positions is checkpointed: its [chunk, V] logits exist once in the forward and
    once more in the backward, never as a whole [B, T, V] tensor. `weight=None`: `hidden` already
    holds logits (masked-diffusion models).
    """
    from torch.utils.checkpoint import checkpoint

    def chunk(h: torch.Tensor, w: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        logits = h if w is None else torch.nn.functional.linear(h, w)
        return token_logprobs(logits.float() / temperature, t)

    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    parts = [
        checkpoint(chunk, flat_h[i : i + chunk_size], weight, flat_t[i : i + chunk_size], use_reentrant=False)
        for i in range(0, flat_h.shape[0], chunk_size)
    ]
    return torch.cat(parts).view(tokens.shape)


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean token log-ratio of each sequence, [B, T] -> [B, 1]: one importance ratio per sequence
    (exp of it), the length-normalised form a sequence-level clip needs."""
    return ((logp - old_logp) * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)


def truncated_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, level: str,
                         cap: float) -> torch.Tensor:
    """Truncated importance weights correcting for the engine sampling from a slightly different
    policy than the learner's: min(pi_learner / pi_engine, cap), per token or per sequence."""
    log_ratio = (old_logp - rollout_logp) * mask
    if level == "token":
        return torch.exp(log_ratio).clamp(max=cap) * mask
    if level == "sequence":
        return torch.exp(log_ratio.sum(dim=1, keepdim=True)).clamp(max=cap) * mask
    raise ValueError(f"Unknown importance-sampling level {level!r}; choose token or sequence.")
