"""Shared pieces of the estimators: their registry, placing an answer (masked where asked) and scoring it."""
from __future__ import annotations

import torch

from rl.core.registry import Registry

ESTIMATORS = Registry("likelihood estimator")
register_estimator, get_estimator = ESTIMATORS.register, ESTIMATORS.lookup


def with_answer(ids: torch.Tensor, positions: torch.Tensor, answer_ids: torch.Tensor, masked: torch.Tensor, mask_id: int):
    """ids with the answer written at `positions`, the mask token where `masked` [B, T] is True."""
    out = ids.clone()
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
    out[rows, positions] = torch.where(masked, torch.full_like(answer_ids, mask_id), answer_ids)
    return out


def answer_logprobs(logits_fn, ids, attention, positions, answer_ids, temperature: float) -> torch.Tensor:
    """log p(answer token k | ids) read at answer position k: [B, T] (float32 or better)."""
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
    logits = logits_fn(ids, attention)[rows, positions]
    logits = (logits if logits.dtype == torch.float64 else logits.float()) / temperature
    return torch.log_softmax(logits, -1).gather(-1, answer_ids[..., None]).squeeze(-1)
