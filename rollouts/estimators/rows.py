"""A registered estimator applied row by row to (prompt, completion) pairs: the one function the
diffusion engine (its reported log-probs and `score`) and the learner (rl.learner.model) call, so
that both compute the same numbers for the same sequence.

Each row is laid out as `rollouts.diffusion.answer_layout` does (prompt, then `answer_length`
answer positions), with d1's prompt mask of its `mask_seed` (`rollouts.diffusion.mask_prompts`).
The completion's tokens are the first len(completion) answer positions, the ones scored; the
answer positions after them stay masked in every forward. The random draws (masking ratios, masks)
come from a CPU generator seeded by the row's own tokens and mask_seed, so a sequence gets the same
draws in the engine and in the learner, in any batch. One row per call of the estimator: `n`
forwards per row (two per pair plus one for `coupled`).
"""
from __future__ import annotations

import zlib

import torch

from rollouts.diffusion import answer_layout, mask_prompts
from rollouts.estimators.common import get_estimator


def row_generator(prompt: list[int], completion: list[int], mask_seed: int) -> torch.Generator:
    seed = zlib.crc32(f"estimator:{int(mask_seed)}:{[int(t) for t in list(prompt) + list(completion)]}".encode())
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def estimate_rows(logits_fn, name: str, prompts: list[list[int]], completions: list[list[int]], *, answer_length: int,
                  pad_id: int, mask_id: int, n: int = 1, mask_seeds: list[int] | None = None,
                  prompt_mask_prob: float = 0.0) -> list[list[float]]:
    """Per completion token, the estimator `name`'s term (see rollouts.estimators). logits_fn takes
    and returns CPU tensors (ids [1, W], attention [1, W]) -> [1, W, V]."""
    estimator = get_estimator(name)
    seeds = [0] * len(prompts) if mask_seeds is None else list(mask_seeds)
    out = []
    for prompt, completion, seed in zip(prompts, completions, seeds):
        if len(completion) > answer_length:
            raise ValueError(f"A completion of {len(completion)} tokens is longer than the {answer_length}-position answer.")
        if not completion:
            out.append([])
            continue
        ids, attention, positions = answer_layout([prompt], answer_length, pad_id, mask_id)
        ids = mask_prompts(ids, [prompt], [completion], [seed], prompt_mask_prob, mask_id)
        answer = torch.tensor([completion], dtype=torch.long)
        terms = estimator(logits_fn, ids, attention, positions[:, : len(completion)], answer, mask_id=mask_id, n=n,
                          generator=row_generator(prompt, completion, seed))
        out.append(terms[0].tolist())
    return out
