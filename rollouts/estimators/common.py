"""Shared pieces of the estimators: their registry, placing an answer (masked where asked) and scoring it.

An estimator is the forwards it runs: `passes(B, T, n=, generator=, device=, **options)` draws them
as a list of (masked [B, T] bool, weight [B, T] float64). Each pass is one forward with the answer
written at its positions and the mask token where `masked`; a token's term is the sum over passes
of weight x log p(token | that pass). The diffusion engine (`Estimator.__call__`, through
rollouts.estimators.rows) and the learner's training forward (rl.learner.model, with gradients)
run the same passes, so that both compute the same numbers.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rl.core.registry import Registry

ESTIMATORS = Registry("likelihood estimator")
get_estimator = ESTIMATORS.lookup


@dataclass(frozen=True)
class Estimator:
    passes: Callable[..., list[tuple[torch.Tensor, torch.Tensor]]]

    def __call__(self, logits_fn, ids, attention, positions, answer_ids, *, mask_id: int, n: int = 1,
                 generator: torch.Generator | None = None, temperature: float = 1.0, **options) -> torch.Tensor:
        """[B, T] float64 terms, each pass's forward through logits_fn(ids, attention) -> [B, W, V]."""
        B, T = answer_ids.shape
        total = torch.zeros((B, T), dtype=torch.float64, device=answer_ids.device)
        for masked, weight in self.passes(B, T, n=n, generator=generator, device=answer_ids.device, **options):
            lp = answer_logprobs(logits_fn, with_answer(ids, positions, answer_ids, masked, mask_id), attention,
                                 positions, answer_ids, temperature)
            total += weighted(weight, lp.double())
        return total


def register_estimator(name: str):
    """Decorator: register passes(B, T, *, n, generator, device, **options) as the estimator `name`."""
    def wrap(passes):
        ESTIMATORS.register(name)(Estimator(passes))
        return passes

    return wrap


def weighted(weight: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """weight x logprobs, exactly 0 where the weight is 0 (a token a pass does not score may be -inf there)."""
    return torch.where(weight != 0, weight.to(logprobs.dtype) * logprobs, torch.zeros_like(logprobs))


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
