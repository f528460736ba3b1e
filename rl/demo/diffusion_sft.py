"""Masked-diffusion supervised fine-tuning: LLaDA's SFT objective, as pure functions over tensors.

A masked diffusion LLM is trained to undo random masking: for each sequence a ratio t is drawn,
every answer token is replaced by the mask token with probability t (the prompt never: it is the
condition, always visible at sampling time), and the model predicts the original token at each
masked position. Weighting the cross-entropy by 1/t makes the loss an upper bound on the answer's
negative log-likelihood (the ELBO of the masking process), which is what lets a diffusion model
be trained like a likelihood model.

Layout (the same one the sampler generates in): a row is [prompt ; answer], the answer padded
with EOS up to a fixed `answer_length`, the row then right-padded with the pad token to the batch
width. The EOS padding is part of the answer and of the loss: LLaDA trains on it so that a
fixed-length generation learns to end its text with EOS tokens. Position i's logits predict token
i (no shift: the model is bidirectional and sees every position at once).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class SFTBatch(NamedTuple):
    """One batch in the diffusion layout; `answer_lens` counts the answer with its EOS padding."""

    input_ids: torch.Tensor  # [B, W] long
    attention_mask: torch.Tensor  # [B, W] long, 0 on the right padding after the answer
    prompt_lens: torch.Tensor  # [B] long
    answer_lens: torch.Tensor  # [B] long


def eos_padded_answer(answer_ids: list[int], eos_id: int, answer_length: int) -> list[int]:
    """The answer's tokens then EOS up to `answer_length`.

    Raises instead of truncating: a truncated answer would teach the model to stop before its
    final answer, and at sampling time it could never produce one that fits.
    """
    if len(answer_ids) >= answer_length:
        raise ValueError(
            f"answer of {len(answer_ids)} tokens does not fit answer_length={answer_length} "
            "with at least one EOS after it; raise answer_length"
        )
    return list(answer_ids) + [eos_id] * (answer_length - len(answer_ids))


def sft_batch(
    prompts: list[list[int]], answers: list[list[int]], *, answer_length: int, eos_id: int, pad_id: int
) -> SFTBatch:
    """Rows [prompt ; EOS-padded answer] right-padded with `pad_id` (masked out of attention)."""
    rows = [list(p) + eos_padded_answer(a, eos_id, answer_length) for p, a in zip(prompts, answers)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    attention_mask = (torch.arange(width)[None] < lengths[:, None]).long()
    prompt_lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    answer_lens = torch.full((len(rows),), answer_length, dtype=torch.long)
    return SFTBatch(input_ids, attention_mask, prompt_lens, answer_lens)


def answer_positions(width: int, prompt_lens: torch.Tensor, answer_lens: torch.Tensor) -> torch.Tensor:
    """[B, W] bool: True on positions prompt_len <= i < prompt_len + answer_len of each row."""
    pos = torch.arange(width, device=prompt_lens.device)[None]
    return (pos >= prompt_lens[:, None]) & (pos < (prompt_lens + answer_lens)[:, None])


def mask_answers(
    input_ids: torch.Tensor,
    prompt_lens: torch.Tensor,
    answer_lens: torch.Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward (noising) process: returns (noisy_ids, masked [B, W] bool, t [B]).

    t ~ U[eps, 1] per row and each answer token is masked independently with probability t.
    eps > 0 keeps 1/t finite; drawing t per row (not one per batch) spreads every batch over
    all noise levels, from nearly clean answers to fully masked ones (the sampler's first step).
    """
    batch, width = input_ids.shape
    device = input_ids.device
    t = eps + (1 - eps) * torch.rand(batch, generator=generator, device=device)
    coin = torch.rand(batch, width, generator=generator, device=device)
    masked = (coin < t[:, None]) & answer_positions(width, prompt_lens, answer_lens)
    noisy_ids = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return noisy_ids, masked, t


def masked_diffusion_sft_loss(
    logits: torch.Tensor, target_ids: torch.Tensor, masked: torch.Tensor, t: torch.Tensor, answer_lens: torch.Tensor
) -> torch.Tensor:
    """LLaDA's SFT loss: mean over rows of (sum over masked positions of CE / t) / answer_len.

    logits [B, W, V] (position i predicts token i), target_ids [B, W] (the clean tokens),
    masked [B, W] bool, t [B] (each row's mask ratio), answer_lens [B] (answer tokens including
    the EOS padding).

    Normaliser: each row's sum is divided by its own answer length, then rows are averaged, as
    in LLaDA. In expectation over the masking, a row's term is then its per-token answer NLL
    bound, so every sequence weighs the same whatever its length, and the loss's scale does not
    depend on t or on how many tokens happened to be masked (dividing by the masked count
    instead would cancel the 1/t weighting and bias the estimate). With the fixed-length EOS
    layout every row has the same answer length, so this equals dividing the batch's sum by its
    total number of answer tokens (the token-level normalisation of the RL losses).

    Only masked positions enter the loss, so the gradient reaches the model only through them.
    """
    rows = masked.nonzero(as_tuple=True)[0]
    nll = F.cross_entropy(logits[masked].float(), target_ids[masked], reduction="none")
    weight = 1.0 / (t[rows].float() * answer_lens[rows].float())
    return (nll * weight).sum() / masked.shape[0]
