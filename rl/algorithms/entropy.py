"""Per-token policy entropy over a large vocabulary, and the top-entropy token filter.

The filter serves the 80/20 policy-gradient filter (arXiv 2506.01939: keep the top 20% of a
batch's tokens by entropy) and IGPO's hint filter (keep the top tau of each inpainted sample's hint
positions, at least one): it takes any mask and keeps a fraction of its 1-entries.
"""
from __future__ import annotations

import torch

from rl.core.kernels import chunk_logits, log_softmax_

SCOPES = ("batch", "sequence")


@torch.no_grad()
def chunked_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 512,
) -> torch.Tensor:
    """Entropy of softmax(hidden @ W^T / T) per position: [..., H] -> [...] float32 (float64 stays).

    Logits exist for `chunk_size` positions at a time, never as one [..., V] tensor. No gradient:
    it is meant for filtering and logging, not as a loss term. `lm_head_weight=None` means `hidden`
    already holds logits. Positions where `mask` is 0 are skipped and give 0.
    """
    leading = hidden.shape[:-1]
    rows = hidden.reshape(-1, hidden.shape[-1])
    valid = None if mask is None else mask.reshape(-1).nonzero().squeeze(-1)
    if valid is not None:
        rows = rows[valid]
    out = rows.new_empty(rows.shape[0], dtype=torch.promote_types(rows.dtype, torch.float32))
    for start in range(0, rows.shape[0], chunk_size):
        logp, p = log_softmax_(chunk_logits(rows[start:start + chunk_size], lm_head_weight, temperature))
        out[start:start + chunk_size] = -p.mul_(logp).sum(dim=-1)
    if valid is None:
        return out.view(leading)
    return out.new_zeros(leading.numel()).index_copy(0, valid, out).view(leading)


def keep_counts(valid_counts: torch.Tensor, fraction: float, round_up: bool = True) -> torch.Tensor:
    """How many of n valid tokens to keep: ceil(fraction * n) (the 80/20 filter), or with
    round_up=False floor(fraction * n) (IGPO's released hint filter); at least one whenever n >= 1.

    fraction * n is first rounded to 9 decimals so that float noise cannot add or drop a token
    (0.28 * 25 = 7.000000000000001 keeps 7, not 8).
    """
    exact = torch.round(valid_counts.double() * fraction, decimals=9)
    counts = torch.ceil(exact) if round_up else torch.floor(exact)
    return torch.minimum(counts.long().clamp(min=1), valid_counts.long())


def top_entropy_mask(
    entropy: torch.Tensor, mask: torch.Tensor, fraction: float, scope: str = "batch", round_up: bool = True
) -> torch.Tensor:
    """Mask (dtype of `mask`) keeping the top `fraction` of the valid tokens by entropy.

    scope "batch": ranks all valid tokens of `entropy` together (any shape).
    scope "sequence": ranks each row of a [B, T] `entropy` separately.
    Keeps exactly `keep_counts(n, fraction, round_up)` of the n valid tokens per scope (at least one);
    ties are broken toward the earlier position (row-major order), so the result is deterministic.
    """
    if scope not in SCOPES:
        raise ValueError(f"Unknown entropy-filter scope {scope!r}; choose one of {SCOPES}.")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    if scope == "sequence" and entropy.dim() != 2:
        raise ValueError(f"scope 'sequence' needs [B, T] entropies, got shape {tuple(entropy.shape)}.")
    values = entropy.reshape(1, -1) if scope == "batch" else entropy
    valid = mask.reshape(values.shape) > 0
    order = _rank_order(values, valid)
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    keep = valid & (rank < keep_counts(valid.sum(dim=-1), fraction, round_up).unsqueeze(-1))
    return keep.reshape(mask.shape).to(mask.dtype)


def _rank_order(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row, positions ordered by (valid first, entropy descending, position ascending)."""
    # Two stable sorts give the lexicographic order: the later sort's key dominates, ties keep the earlier order.
    by_value = torch.sort(values, dim=-1, descending=True, stable=True).indices
    by_validity = torch.sort(valid.gather(-1, by_value).to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return by_value.gather(-1, by_validity)
