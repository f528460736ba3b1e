"""The token log-probability kernels every layer shares: logits a chunk of positions at a time,
log-probs and entropies from one pass with an analytic backward, so that [positions, vocabulary]
never exists whole. Pure functions over tensors (the learner scores with them, the algorithms'
losses and divergences build on them)."""
from __future__ import annotations

import torch


def lm_logits(hidden: torch.Tensor, lm_head_weight: torch.Tensor | None) -> torch.Tensor:
    """hidden @ W^T, or `hidden` itself when it already holds logits (weight None)."""
    return hidden if lm_head_weight is None else hidden @ lm_head_weight.T


def upcast(x: torch.Tensor) -> torch.Tensor:
    # At least float32 for the softmax over ~150k entries; float64 stays float64 (tests).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log_softmax_(scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, p) over the last dim with one exp pass, overwriting `scaled` with log p (no autograd).

    On CPU every new [chunk, V] tensor costs page faults, and exp is the dearest pass: this does
    what log_softmax followed by exp would, with one allocation and one exp instead of two each.
    """
    scaled -= scaled.amax(dim=-1, keepdim=True)
    p = scaled.exp()
    total = p.sum(dim=-1, keepdim=True)
    p /= total
    scaled -= total.log_()
    return scaled, p


def chunk_logits(rows: torch.Tensor, weight: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """logits / T of a chunk of rows in at least float32, as a tensor free to overwrite (no autograd)."""
    logits = lm_logits(rows, weight)
    wide = upcast(logits)
    if wide is rows:  # logits passed in by the caller: never overwrite them
        return wide / temperature
    return wide.div_(temperature)


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
