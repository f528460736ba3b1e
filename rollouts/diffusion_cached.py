"""The cached, parallel masked-diffusion sampler: LLaDA's block sampler (rollouts.diffusion) with
Fast-dLLM's block KV cache and confidence-threshold parallel decoding, as a pure function.

cache (which positions each model call computes):
- "none": every call is a full forward over [prompt ; answer] through a plain `logits_fn`. With
  threshold None this is bit-identical to `rollouts.diffusion.diffusion_sample` (same seed, same
  tokens, the same generator draws): the same code path, over every answer position.
- "prefix": the first call of each block is a full forward that also fills the cache (so the
  cache is refreshed each time a block is finished, Fast-dLLM's rule); the block's later calls
  compute only the current block and everything after it (the masked suffix), attending to the
  cached keys/values of the prompt and the finished blocks.
- "dual": as "prefix", but the later calls compute only the current block's positions; the
  masked suffix is read from the cache too.
In the cached modes logits are formed only at the block's still-masked positions (no [B, W, V]
tensor); the Gumbel noise and random scores are drawn at those positions only, so sampled tokens
follow the same law as the plain sampler but not the same draws.

threshold (parallel decoding, Fast-dLLM's rule): None keeps LLaDA's schedule (steps / blocks
calls per block, the block's masked count spread evenly). A number commits, at each call, every
masked block position whose confidence (the sampled token's probability) is at least `threshold`,
and always the most confident one, so a block takes between 1 and block_length calls; the calls
each block took are returned. Only with low_confidence remasking.

Hints (IGPO's inpainting) are filled before the first call, never masked, so never overwritten,
never candidates and outside every budget, as in the plain sampler.

Models: `cache != "none"` needs a model with `forward_cached` (rollouts.llada_model's
LLaDAForDiffusion); anything else is sampled through `logits_fn` without a cache, and the result
says which cache was used (`cache_used`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rollouts.diffusion import REMASKING, check_schedule, gumbel_argmax, layout_with_hints, steps_budget
from rollouts.llada_model import supports_cache

CACHES = ("none", "prefix", "dual")


@dataclass
class CachedDiffusionSample:
    tokens: torch.Tensor  # [B, gen_length]
    committed: torch.Tensor  # [B, steps taken] masked positions committed at each step (hints excluded)
    hint_mask: torch.Tensor  # [B, gen_length]
    calls_per_block: list[int]  # model calls each block took (varies with a threshold; a cached block whose
    # positions are all hints or already committed skips its remaining calls)
    full_calls: int  # of those, full-width forwards (cache refreshes; every call without a cache)
    cache_used: str


def _plain_logits_fn(model):
    if supports_cache(model):
        return lambda ids, attention: model.forward_cached(ids, attention, use_cache=False).logits
    return model


def _select(score: torch.Tensor, k: torch.Tensor | None, threshold: float | None) -> torch.Tensor:
    """score [B, P] (-inf where not a candidate) -> bool [B, P] positions to commit: the k best
    (stable: ties go left), or with a threshold the best one plus every one scoring >= threshold."""
    order = score.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(score.shape[1], device=score.device).expand_as(order).contiguous())
    finite = torch.isfinite(score)
    if threshold is None:
        return (rank < k[:, None]) & finite
    return finite & ((rank == 0) | (score >= threshold))


@torch.no_grad()
def cached_diffusion_sample(
    model,
    prompts: list[list[int]],
    *,
    mask_id: int,
    pad_id: int,
    gen_length: int,
    block_length: int,
    steps: int,
    temperature: float,
    remasking: str = "low_confidence",
    hints: list[dict[int, int]] | None = None,
    generator: torch.Generator | None = None,
    cache: str = "none",
    threshold: float | None = None,
    refresh_every: int | None = None,
    record: list | None = None,
) -> CachedDiffusionSample:
    """`model`: a cache-capable model (`forward_cached`) or a logits_fn (ids [B, W], attention [B, W])
    -> [B, W, V]. refresh_every k: in a cached mode, also refresh the cache (a full forward) every
    k-th call of a block (1: every call, which computes what cache "none" computes). record: a list
    that receives (answer indices [B, P], logits [B, P, V]) for every call (for tests)."""
    _check_options(gen_length, block_length, steps, remasking, cache, threshold, refresh_every)
    cache_used = cache if cache != "none" and supports_cache(model) else "none"
    device = getattr(next(model.parameters()), "device", None) if cache_used != "none" else None
    ids, attention, positions, hint_mask = layout_with_hints(prompts, gen_length, pad_id, mask_id, hints, device)
    sampler = _BlockSampler(model, cache_used, ids, attention, positions, mask_id, temperature, remasking, generator,
                            threshold, refresh_every, record)
    blocks = gen_length // block_length
    for b in range(blocks):
        sampler.fill_block(b * block_length, (b + 1) * block_length, steps // blocks)
    rows = torch.arange(len(prompts), device=ids.device)[:, None]
    committed = (torch.stack(sampler.committed, 1) if sampler.committed
                 else torch.zeros((len(prompts), 0), dtype=torch.long))
    return CachedDiffusionSample(ids[rows, positions], committed, hint_mask, sampler.calls_per_block,
                                 sampler.full_calls, cache_used)


def _check_options(gen_length, block_length, steps, remasking, cache, threshold, refresh_every) -> None:
    check_schedule(gen_length, block_length, steps)
    if remasking not in REMASKING:
        raise ValueError(f"diffusion.remasking must be one of {REMASKING}, got {remasking!r}.")
    if cache not in CACHES:
        raise ValueError(f"diffusion.cache must be one of {CACHES}, got {cache!r}.")
    if threshold is not None and (remasking != "low_confidence" or not 0 < threshold <= 1):
        raise ValueError("diffusion.threshold (parallel decoding) needs remasking=low_confidence and 0 < threshold <= 1.")
    if refresh_every is not None and refresh_every < 1:
        raise ValueError(f"refresh_every must be >= 1, got {refresh_every}.")


class _BlockSampler:
    """Fills the answer one block at a time, editing `ids` in place; counts the calls made."""

    def __init__(self, model, cache_used, ids, attention, positions, mask_id, temperature, remasking, generator,
                 threshold, refresh_every, record):
        self.model, self.cache_used, self.logits_fn = model, cache_used, _plain_logits_fn(model)
        self.ids, self.attention, self.positions, self.mask_id = ids, attention, positions, mask_id
        self.temperature, self.remasking, self.generator = temperature, remasking, generator
        self.threshold, self.refresh_every, self.record = threshold, refresh_every, record
        self.rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        self.gen_length = positions.shape[1]
        self.neg_inf = torch.tensor(-torch.inf, dtype=torch.float64, device=ids.device)
        self.committed: list[torch.Tensor] = []
        self.calls_per_block: list[int] = []
        self.full_calls = 0

    def fill_block(self, lo: int, hi: int, per_block: int) -> None:
        in_block = torch.zeros(self.gen_length, dtype=torch.bool, device=self.ids.device)
        in_block[lo:hi] = True
        budget = steps_budget(((self._answer() == self.mask_id) & in_block).sum(1), per_block)
        kv, s, calls = None, 0, 0
        while True:
            answer = self._answer()
            todo = (answer == self.mask_id) & in_block
            if (self.threshold is None and s >= per_block) or (self.threshold is not None and not todo.any()):
                break
            called = self._call(lo, hi, todo, s, kv)
            if called is None:  # nothing left to commit in this block (hints): no call needed
                self.committed.append(torch.zeros(self.ids.shape[0], dtype=torch.long, device=self.ids.device))
                s += 1
                continue
            cand, logits, kv = called
            calls += 1
            self._commit(cand, logits, answer, todo, None if self.threshold is not None else budget[:, s])
            s += 1
        self.calls_per_block.append(calls)

    def _answer(self) -> torch.Tensor:
        return self.ids[self.rows, self.positions]

    def _call(self, lo: int, hi: int, todo: torch.Tensor, s: int, kv):
        """(candidate answer indices [B, P], their logits [B, P, V], the cache) of one model call."""
        ids, attention, positions, rows = self.ids, self.attention, self.positions, self.rows
        if self.cache_used == "none":
            self.full_calls += 1
            logits = self.logits_fn(ids, attention)[rows, positions].float()  # [B, L, V], as diffusion_sample
            return torch.arange(self.gen_length, device=ids.device).expand(ids.shape[0], self.gen_length), logits, kv
        block_todo = todo[:, lo:hi]
        n_cand = int(block_todo.sum(1).max())
        if n_cand == 0:
            return None
        # The block's masked positions first, in left-to-right order: [B, n_cand] block-local.
        local = (~block_todo).long().argsort(dim=1, stable=True)[:, :n_cand]
        cand = lo + local
        if kv is None or (self.refresh_every is not None and s % self.refresh_every == 0):
            out = self.model.forward_cached(ids, attention, logits_at=positions[rows, cand])
            self.full_calls += 1
            return cand, out.logits.float(), out.cache
        span = positions[:, lo:] if self.cache_used == "prefix" else positions[:, lo:hi]
        out = self.model.forward_cached(ids, attention, span=span, cache=kv, logits_at=local)
        return cand, out.logits.float(), kv

    def _commit(self, cand, logits, answer, todo, k) -> None:
        if self.record is not None:
            self.record.append((cand.clone(), logits.clone()))
        if self.threshold is not None:
            # A committed mask token would leave its position masked, and a block could then take
            # calls without end: with a threshold every call commits at least one real token.
            logits = logits.clone()
            logits[..., self.mask_id] = -torch.inf
        predicted = gumbel_argmax(logits, self.temperature, self.generator)
        if self.remasking == "low_confidence":
            score = torch.softmax(logits, -1).gather(-1, predicted[..., None]).squeeze(-1)
        else:
            score = torch.rand(predicted.shape, generator=self.generator, device=predicted.device)
        score = torch.where(todo.gather(1, cand), score.double(), self.neg_inf)
        take = _select(score, k, self.threshold)
        self.ids[self.rows, self.positions.gather(1, cand)] = torch.where(take, predicted, answer.gather(1, cand))
        self.committed.append(take.sum(1))
