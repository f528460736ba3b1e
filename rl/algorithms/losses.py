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


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[token] per position, [B, T, V] x [B, T] -> [B, T]."""
    # logsumexp + gather avoids materialising a second [B, T, V] tensor for log_softmax.
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)



class _ChunkedTokenLogprobs(torch.autograd.Function):
    """log_softmax(rows @ W^T / T)[token] over [N, H] rows, one chunk of rows at a time, and each
    row's entropy from the same logits (no gradient).

    The backward applies the analytic gradient, d logp_t / d logits = (onehot(t) - p) / T. It needs
    each chunk's probabilities p: kept from the forward when all of them fit in `keep_bytes`
    (a learner micro-batch of a small-vocabulary model: one lm_head product and softmax fewer per
    step), else recomputed chunk by chunk, as a checkpointed autograd forward would, so that the
    logits never exist as one [N, V] tensor. The entropy costs no lm_head product of its own.
    `weight=None`: the rows are logits already.
    """

    @staticmethod
    def forward(ctx, rows, weight, tokens, temperature, chunk_size, keep_bytes):
        from rl.algorithms.divergences import chunk_logits, log_softmax_

        ctx.save_for_backward(rows, weight, tokens)
        ctx.options = (temperature, chunk_size)
        dtype = torch.promote_types(rows.dtype, torch.float32)
        vocab = rows.shape[-1] if weight is None else weight.shape[0]
        keep = rows.shape[0] * vocab * dtype.itemsize <= keep_bytes
        ctx.kept = [] if keep else None
        logp, entropy = rows.new_empty(rows.shape[0], dtype=dtype), rows.new_empty(rows.shape[0], dtype=dtype)
        for start in range(0, rows.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            log_p, p = log_softmax_(chunk_logits(rows[part], weight, temperature))
            logp[part] = log_p.gather(-1, tokens[part, None]).squeeze(-1)
            if keep:
                ctx.kept.append(p)
                entropy[part] = -(p * log_p).sum(dim=-1)
            else:
                entropy[part] = -p.mul_(log_p).sum(dim=-1)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        from rl.algorithms.divergences import chunk_logits, log_softmax_

        rows, weight, tokens = ctx.saved_tensors
        temperature, chunk_size = ctx.options
        kept, ctx.kept = ctx.kept, None
        want_rows, want_weight = ctx.needs_input_grad[:2]
        grad_rows = torch.zeros_like(rows) if want_rows else None
        # float32 accumulator: summing a bf16 [V, H] gradient over many chunks would lose precision.
        grad_weight = None
        if want_weight:
            grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        for k, start in enumerate(range(0, rows.shape[0], chunk_size)):
            part = slice(start, start + chunk_size)
            p = kept[k] if kept is not None else log_softmax_(chunk_logits(rows[part], weight, temperature))[1]
            g = grad_logp[part].to(p.dtype).unsqueeze(-1)
            grad_logits = p.mul_(-g).scatter_add_(-1, tokens[part, None], g).div_(temperature).to(rows.dtype)
            if want_rows:
                grad_rows[part] = grad_logits if weight is None else grad_logits @ weight
            if want_weight and grad_weight.dtype == rows.dtype:
                grad_weight.addmm_(grad_logits.T, rows[part])  # in place: no [V, H] temporary per chunk
            elif want_weight:
                grad_weight += grad_logits.T @ rows[part]
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_rows, grad_weight, None, None, None, None


def chunked_token_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | None,
    tokens: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 512,
    keep_bytes: int = 256 * 2**20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log_softmax(hidden @ W^T / T)[token], entropy of that distribution) per position,
    [B, T, H] -> two [B, T]; gradients reach the log-probs' `hidden` and `weight`, not the entropy.

    Logits exist for `chunk_size` positions at a time. Positions where `mask` is 0 (padding) are
    skipped and give 0 in both. `weight=None`: `hidden` already holds logits (masked-diffusion models).
    The probabilities are kept for the backward when they take at most `keep_bytes` (256 MiB: a few
    thousand positions of a 50k vocabulary), else recomputed there.
    """
    leading = tokens.shape
    rows, flat = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    valid = None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)
    if valid is not None:
        rows, flat = rows[valid], flat[valid]
    logp, entropy = _ChunkedTokenLogprobs.apply(rows, weight, flat, temperature, chunk_size, keep_bytes)
    if valid is None:
        return logp.view(leading), entropy.view(leading)
    return tuple(x.new_zeros(leading.numel()).index_copy(0, valid, x).view(leading) for x in (logp, entropy))


def chunked_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor | None, tokens: torch.Tensor, temperature: float = 1.0,
    chunk_size: int = 512, mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log_softmax(hidden @ W^T / T)[token] per position, [B, T, H] -> [B, T], with gradients
    (`chunked_token_logprobs_and_entropy` without the entropy)."""
    return chunked_token_logprobs_and_entropy(hidden, weight, tokens, mask, temperature, chunk_size)[0]


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
    log_ratio = (old_logp - rollout_logp) * mask
    if level in ("sequence", "sequence_mask"):
        log_ratio = log_ratio.sum(dim=1, keepdim=True)
    elif level not in ("token", "token_mask"):
        raise ValueError(f"Unknown importance-sampling level {level!r}; choose token, sequence, token_mask or sequence_mask.")
    ratio = torch.exp(log_ratio)
    weights = ratio.clamp(max=cap) if level in ("token", "sequence") else ratio * (ratio <= cap)
    return weights * mask
