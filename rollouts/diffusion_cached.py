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

from rollouts.diffusion import REMASKING, answer_layout, check_schedule, gumbel_argmax, steps_budget
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
    check_schedule(gen_length, block_length, steps)
    if remasking not in REMASKING:
        raise ValueError(f"diffusion.remasking must be one of {REMASKING}, got {remasking!r}.")
    if cache not in CACHES:
        raise ValueError(f"diffusion.cache must be one of {CACHES}, got {cache!r}.")
    if threshold is not None and (remasking != "low_confidence" or not 0 < threshold <= 1):
        raise ValueError("diffusion.threshold (parallel decoding) needs remasking=low_confidence and 0 < threshold <= 1.")
    if refresh_every is not None and refresh_every < 1:
        raise ValueError(f"refresh_every must be >= 1, got {refresh_every}.")
    cache_used = cache if cache != "none" and supports_cache(model) else "none"
    logits_fn = _plain_logits_fn(model)

    ids, attention, positions = answer_layout(prompts, gen_length, pad_id, mask_id)
    device = getattr(next(model.parameters()), "device", None) if cache_used != "none" else None
    if device is not None:
        ids, attention, positions = ids.to(device), attention.to(device), positions.to(device)
    B = len(prompts)
    rows = torch.arange(B, device=ids.device)[:, None]
    hint_mask = torch.zeros((B, gen_length), dtype=torch.bool, device=ids.device)
    for i, hint in enumerate(hints or []):
        for pos, token in hint.items():
            if not 0 <= pos < gen_length:
                raise ValueError(f"Hint position {pos} of row {i} is outside the answer (length {gen_length}).")
            ids[i, positions[i, pos]] = token
            hint_mask[i, pos] = True
    blocks = gen_length // block_length
    per_block = steps // blocks
    committed: list[torch.Tensor] = []
    calls_per_block: list[int] = []
    full_calls = 0
    neg_inf = torch.tensor(-torch.inf, dtype=torch.float64, device=ids.device)
    for b in range(blocks):
        lo, hi = b * block_length, (b + 1) * block_length
        in_block = torch.zeros(gen_length, dtype=torch.bool, device=ids.device)
        in_block[lo:hi] = True
        answer = ids[rows, positions]
        budget = steps_budget(((answer == mask_id) & in_block).sum(1), per_block)
        kv = None
        s = calls = 0
        while True:
            answer = ids[rows, positions]
            masked = answer == mask_id
            todo = masked & in_block
            if threshold is None and s >= per_block:
                break
            if threshold is not None and not todo.any():
                break
            if cache_used == "none":
                logits = logits_fn(ids, attention)[rows, positions].float()  # [B, L, V], as diffusion_sample
                cand = torch.arange(gen_length, device=ids.device).expand(B, gen_length)
                full_calls += 1
            else:
                block_todo = todo[:, lo:hi]
                n_cand = int(block_todo.sum(1).max())
                if n_cand == 0:  # nothing left to commit in this block (hints): no call needed
                    committed.append(torch.zeros(B, dtype=torch.long, device=ids.device))
                    s += 1
                    continue
                # The block's masked positions first, in left-to-right order: [B, n_cand] block-local.
                local = (~block_todo).long().argsort(dim=1, stable=True)[:, :n_cand]
                cand = lo + local
                if kv is None or (refresh_every is not None and s % refresh_every == 0):
                    out = model.forward_cached(ids, attention, logits_at=positions[rows, cand])
                    kv = out.cache
                    full_calls += 1
                else:
                    span = positions[:, lo:] if cache_used == "prefix" else positions[:, lo:hi]
                    out = model.forward_cached(ids, attention, span=span, cache=kv, logits_at=local)
                logits = out.logits.float()
            calls += 1
            if record is not None:
                record.append((cand.clone(), logits.clone()))
            predicted = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                score = torch.softmax(logits, -1).gather(-1, predicted[..., None]).squeeze(-1)
            else:
                score = torch.rand(predicted.shape, generator=generator, device=predicted.device)
            valid = todo.gather(1, cand)
            score = torch.where(valid, score.double(), neg_inf)
            take = _select(score, None if threshold is not None else budget[:, s], threshold)
            current = answer.gather(1, cand)
            ids[rows, positions.gather(1, cand)] = torch.where(take, predicted, current)
            committed.append(take.sum(1))
            s += 1
        calls_per_block.append(calls)
    return CachedDiffusionSample(
        ids[rows, positions], torch.stack(committed, 1) if committed else torch.zeros((B, 0), dtype=torch.long),
        hint_mask, calls_per_block, full_calls, cache_used,
    )
