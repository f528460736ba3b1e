"""A registered estimator applied to batches of (prompt, completion) pairs: the one function the
diffusion engine (its reported log-probs and `score`) and the learner (rl.learner.model) call, so
that both compute the same numbers for the same sequence.

Each row is laid out as `rollouts.diffusion.answer_layout` does (prompt, then `answer_length`
answer positions), with d1's prompt mask of its `mask_seed` (`rollouts.diffusion.mask_prompts`).
The completion's tokens are the first len(completion) answer positions, the ones scored; the
answer positions after them stay masked in every forward. The random draws (masking ratios, masks)
come from a CPU generator seeded by the row's completion and mask_seed, so a sequence gets the same
draws in the engine and in the learner, in any batch, and under a distillation teacher's prompt; rows are then stacked, each pass one
forward over a batch of rows.
"""
from __future__ import annotations

import zlib

import torch

from rollouts.diffusion import answer_layout, mask_prompts
from rollouts.estimators.common import answer_logprobs, get_estimator, weighted, with_answer


def row_generator(completion: list[int], mask_seed: int) -> torch.Generator:
    # Not the prompt: a distillation teacher shown another prompt must mask the student's positions.
    seed = zlib.crc32(f"estimator:{int(mask_seed)}:{[int(t) for t in completion]}".encode())
    return torch.Generator().manual_seed(seed)


def stacked_passes(name: str, prompts: list[list[int]], completions: list[list[int]], mask_seeds: list[int], *,
                   n: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The estimator's passes over a batch of rows, (masked [B, width], weight [B, width]) on the CPU:
    each row draws its own from row_generator, as it would alone; positions after a row's
    completion stay masked and unweighted."""
    estimator = get_estimator(name)
    B = len(prompts)
    passes = None
    for i, (prompt, completion, seed) in enumerate(zip(prompts, completions, mask_seeds)):
        drawn = estimator.passes(1, len(completion), n=n, generator=row_generator(completion, seed))
        if passes is None:
            passes = [(torch.ones((B, width), dtype=torch.bool), torch.zeros((B, width), dtype=torch.float64)) for _ in drawn]
        for (masked, weight), (row_masked, row_weight) in zip(passes, drawn):
            masked[i, : len(completion)] = row_masked[0]
            weight[i, : len(completion)] = row_weight[0]
    return passes or []


@torch.no_grad()
def estimate_rows(logits_fn, name: str, prompts: list[list[int]], completions: list[list[int]], *, answer_length: int,
                  pad_id: int, mask_id: int, n: int = 1, mask_seeds: list[int] | None = None,
                  prompt_mask_prob: float = 0.0, rows_per_forward: int = 16) -> list[list[float]]:
    """Per completion token, the estimator `name`'s term (see rollouts.estimators), `rows_per_forward`
    rows a forward. logits_fn takes and returns CPU tensors (ids [b, W], attention [b, W]) -> [b, W, V]."""
    seeds = [0] * len(prompts) if mask_seeds is None else list(mask_seeds)
    for completion in completions:
        if len(completion) > answer_length:
            raise ValueError(f"A completion of {len(completion)} tokens is longer than the {answer_length}-position answer.")
    out = []
    for start in range(0, len(prompts), rows_per_forward):
        rows = slice(start, start + rows_per_forward)
        ps, cs, ss = prompts[rows], completions[rows], seeds[rows]
        width = max(map(len, cs))
        if width == 0:
            out += [[] for _ in cs]
            continue
        ids, attention, positions = answer_layout(ps, answer_length, pad_id, mask_id)
        ids = mask_prompts(ids, ps, cs, ss, prompt_mask_prob, mask_id)
        # past a row's completion every pass writes the mask token, whatever the answer holds there
        answer = torch.tensor([c + [mask_id] * (width - len(c)) for c in cs], dtype=torch.long)
        positions = positions[:, :width]
        total = torch.zeros((len(cs), width), dtype=torch.float64)
        for masked, weight in stacked_passes(name, ps, cs, ss, n=n, width=width):
            lp = answer_logprobs(logits_fn, with_answer(ids, positions, answer, masked, mask_id), attention, positions, answer, 1.0)
            total += weighted(weight, lp.double())
        out += [total[i, : len(c)].tolist() for i, c in enumerate(cs)]
    return out
