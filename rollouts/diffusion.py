"""Masked-diffusion sampling (LLaDA's semi-autoregressive block sampler) and the one-step
log-probability estimator, as pure functions over a `logits_fn`.

Layout shared with the learner: each row is its prompt followed by `gen_length` answer positions,
right-padded to the batch width, so a model with absolute positions sees the same positions here
and in training. Position i's logits predict token i (no shift, unlike a causal LM).

Sampling: the answer starts fully masked and is filled block by block, left to right. Within a
block, each step predicts every masked position (Gumbel-max at `temperature`), scores each
prediction (its probability under the model for "low_confidence", a uniform draw for "random"),
and commits the best-scored masked positions of the current block; how many per step is the
block's masked count spread evenly over the block's steps (earlier steps take the remainder).
Hint positions (IGPO's inpainting) are filled before the first step and are never masked, so they
are never overwritten and do not count in the per-step budget.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
from pydantic import Field, model_validator

from rl.core.schema import Section

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [B, W], attention [B, W]) -> [B, W, V]
REMASKING = ("low_confidence", "random")


@dataclass
class DiffusionSample:
    tokens: torch.Tensor  # [B, gen_length] the filled answers
    committed: torch.Tensor  # [B, steps] masked positions committed at each step (hints excluded)
    hint_mask: torch.Tensor  # [B, gen_length] True where the answer token was a fixed hint


def check_schedule(gen_length: int, block_length: int, steps: int) -> None:
    if gen_length % block_length:
        raise ValueError(
            f"The answer length ({gen_length}) must be a multiple of the block length ({block_length}); "
            "change rollout.max_tokens or diffusion.block_length."
        )
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(
            f"diffusion.steps ({steps}) must be a multiple of the number of blocks ({blocks} = "
            f"{gen_length} / {block_length}), since the steps are shared evenly across blocks."
        )


def steps_budget(masked_counts: torch.Tensor, steps: int) -> torch.Tensor:
    """[B] masked counts of a block -> [B, steps] tokens to commit per step: n // steps each, the
    first n % steps steps one more (LLaDA's schedule, linear in the masked fraction)."""
    base = masked_counts // steps
    extra = masked_counts % steps
    return base[:, None] + (torch.arange(steps, device=masked_counts.device)[None, :] < extra[:, None]).long()


def answer_layout(prompts: list[list[int]], gen_length: int, pad_id: int, mask_id: int):
    """(ids [B, W] with every answer position masked, attention [B, W], answer positions [B, L])."""
    width = max(len(p) for p in prompts) + gen_length
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids[i, len(p) : len(p) + gen_length] = mask_id
        attention[i, : len(p) + gen_length] = 1
    starts = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    positions = starts[:, None] + torch.arange(gen_length)[None, :]
    return ids, attention, positions


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    # Gumbel-max on logits / T in float64: the same law as LLaDA's exp(logits) / (-log u)^T,
    # whose low precision in bf16 is a known source of degraded samples.
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (logits.double() / temperature + gumbel).argmax(-1)


def layout_with_hints(prompts: list[list[int]], gen_length: int, pad_id: int, mask_id: int,
                      hints: list[dict[int, int]] | None, device=None):
    """answer_layout's (ids, attention, positions), on `device` if given, with the hints (answer
    position -> token, per row) filled in, and the hint mask [B, gen_length]."""
    ids, attention, positions = answer_layout(prompts, gen_length, pad_id, mask_id)
    if device is not None:
        ids, attention, positions = ids.to(device), attention.to(device), positions.to(device)
    hint_mask = torch.zeros((len(prompts), gen_length), dtype=torch.bool, device=ids.device)
    for i, hint in enumerate(hints or []):
        for pos, token in hint.items():
            if not 0 <= pos < gen_length:
                raise ValueError(f"Hint position {pos} of row {i} is outside the answer (length {gen_length}).")
            ids[i, positions[i, pos]] = token
            hint_mask[i, pos] = True
    return ids, attention, positions, hint_mask


@torch.no_grad()
def diffusion_sample(
    logits_fn: LogitsFn,
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
) -> DiffusionSample:
    """Fill `gen_length` answer positions after each prompt in `steps` model calls; see the module doc.

    hints[i] maps answer positions of row i to fixed token ids (IGPO's revealed reasoning).
    """
    check_schedule(gen_length, block_length, steps)
    if remasking not in REMASKING:
        raise ValueError(f"diffusion.remasking must be one of {REMASKING}, got {remasking!r}.")
    ids, attention, positions, hint_mask = layout_with_hints(prompts, gen_length, pad_id, mask_id, hints)
    rows = torch.arange(len(prompts))[:, None]
    blocks = gen_length // block_length
    per_block = steps // blocks
    committed = torch.zeros((len(prompts), steps), dtype=torch.long)
    for b in range(blocks):
        in_block = torch.zeros(gen_length, dtype=torch.bool)
        in_block[b * block_length : (b + 1) * block_length] = True
        answer = ids[rows, positions]
        budget = steps_budget(((answer == mask_id) & in_block).sum(1), per_block)
        for s in range(per_block):
            logits = logits_fn(ids, attention)[rows, positions].float()  # [B, L, V]
            answer = ids[rows, positions]
            masked = answer == mask_id
            predicted = gumbel_argmax(logits, temperature, generator)
            if remasking == "low_confidence":
                score = torch.softmax(logits, -1).gather(-1, predicted[..., None]).squeeze(-1)
            else:
                score = torch.rand(predicted.shape, generator=generator, device=predicted.device)
            score = torch.where(masked & in_block, score.double(), torch.tensor(-torch.inf, dtype=torch.float64))
            # The k best-scored masked positions of the block: rank < k (stable sort: ties go left).
            order = score.argsort(dim=1, descending=True, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(gen_length).expand_as(order).contiguous())
            take = (rank < budget[:, s : s + 1]) & torch.isfinite(score)
            ids[rows, positions] = torch.where(take, predicted, answer)
            committed[:, b * per_block + s] = take.sum(1)
    return DiffusionSample(ids[rows, positions], committed, hint_mask)


def one_step_logprobs(
    logits: torch.Tensor, answer_positions: torch.Tensor, answer_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """diffu-GRPO's estimator from d1: log p(answer token k) read at answer position k of ONE
    forward with every answer position masked. logits [B, W, V], positions/ids [B, T] -> [B, T]."""
    rows = torch.arange(logits.shape[0], device=logits.device)[:, None]
    picked = logits[rows, answer_positions].float() / temperature
    return torch.log_softmax(picked, -1).gather(-1, answer_ids[..., None]).squeeze(-1)


# The training batch's per-sequence field (SequenceBatch.seq_fields) holding a row's mask_seed.
MASK_SEED_FIELD = "mask_seed"


def prompt_mask(prompt: list[int], completion: list[int], mask_seed: int, prob: float) -> torch.Tensor:
    """d1's random prompt masking for the one-step estimator: [len(prompt)] bool, True where a prompt
    token is replaced by the mask token.

    Drawn from a generator seeded by the sequence's own tokens (prompt + completion) and `mask_seed`,
    so every place that scores the sequence (the engine's estimate at generation, `score` in the
    weight-sync check, the learner's policy, old-policy and reference forwards) masks it the same way
    for one mask_seed, while each inner update (mask_seed = its index) draws a fresh mask, as d1 draws
    a new mask seed for each of its mu iterations (dllm-reasoning/d1 diffu_grpo_trainer.py).
    """
    if prob <= 0 or not prompt:
        return torch.zeros(len(prompt), dtype=torch.bool)
    seed = zlib.crc32(f"{int(mask_seed)}:{[int(t) for t in prompt + completion]}".encode())
    return torch.rand(len(prompt), generator=torch.Generator().manual_seed(seed)) < prob


def mask_prompts(
    ids: torch.Tensor, prompts: list[list[int]], completions: list[list[int]], mask_seeds: list[int], prob: float, mask_id: int
) -> torch.Tensor:
    """`answer_layout` ids with each row's prompt masked by `prompt_mask` (ids unchanged at prob 0)."""
    if prob <= 0:
        return ids
    ids = ids.clone()
    for i, (prompt, completion, seed) in enumerate(zip(prompts, completions, mask_seeds)):
        masked = prompt_mask(prompt, completion, seed, prob)
        ids[i, : len(prompt)] = torch.where(masked, mask_id, ids[i, : len(prompt)])
    return ids


def load_masked_diffusion_model(model_path: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """A model mapping token ids to per-position logits: a transformers masked LM (the tiny local
    models), else the model's own class via AutoModel (LLaDA registers its LM there)."""
    from transformers import AutoModel, AutoModelForMaskedLM

    import rollouts.llada_model  # noqa: F401  (registers model_type llada with AutoModelForMaskedLM)

    try:
        return AutoModelForMaskedLM.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        return AutoModel.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)


def resolve_mask_id(tokenizer, mask_token_id: int | None) -> int:
    if mask_token_id is not None:
        return mask_token_id
    if tokenizer.mask_token_id is None:
        raise ValueError(
            "This tokenizer has no mask token, which masked-diffusion sampling needs. Set "
            "rollout.diffusion.mask_token_id (126336 for LLaDA)."
        )
    return tokenizer.mask_token_id


class DiffusionSamplerConfig(Section):
    """LLaDA's semi-autoregressive sampler (arXiv 2502.09992; settings of IGPO, arXiv 2509.10396)."""

    block_length: int = Field(
        32, ge=1, description="Answer positions per block, filled left to right [32]; rollout.max_tokens must be a multiple."
    )
    steps: Optional[int] = Field(
        None,
        ge=1,
        description="Model calls per answer, shared evenly by the blocks; None is half the answer length "
        "(two tokens per call: LLaDA's and IGPO's 128 steps for 256 tokens).",
    )
    remasking: Literal["low_confidence", "random"] = Field(
        "low_confidence",
        description="Which masked positions of the block a step commits: the ones whose sampled token "
        "the model gives the highest probability (LLaDA's default, better on math), or random ones.",
    )
    mask_token_id: Optional[int] = Field(
        None, description="The mask token; None takes the tokenizer's (LLaDA's tokenizer has none: 126336)."
    )
    cache: Literal["none", "prefix", "dual"] = Field(
        "none",
        description="Fast-dLLM's block KV cache (arXiv 2505.22618; rollouts.diffusion_cached). none: every "
        "call is a full forward over [prompt ; answer], LLaDA's sampler as released (the paper recipes: the "
        "IGPO and d1 releases sample with use_cache=False), bit-identical to the plain sampler. prefix: the "
        "first call of each block is a full forward that refreshes the cache; the block's later calls compute "
        "only the current block and the masked suffix after it, reading the prompt's and the finished blocks' "
        "keys/values from the cache. dual: as prefix, and the masked suffix is read from the cache too, so "
        "those calls compute the block's positions only. Approximate (the cached keys/values are those of "
        "the block's first call). Only LLaDA checkpoints get it (the engine then loads them with "
        "rollouts.llada_model); other models (the tiny BERT test models) are sampled without a cache.",
    )
    threshold: Optional[float] = Field(
        None,
        description="Fast-dLLM's confidence-threshold parallel decoding: each call commits every masked "
        "position of the block whose sampled token has probability >= threshold, and at least the most "
        "confident one, so a block takes 1..block_length calls instead of steps/blocks (logged as "
        "rollout/diffusion_calls_per_block). None: LLaDA's fixed schedule. 0 < threshold <= 1 (Fast-dLLM: "
        "0.9), low_confidence remasking only; any model (no cache needed).",
    )

    @model_validator(mode="after")
    def _check_threshold(self) -> "DiffusionSamplerConfig":
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ValueError(f"rollout.diffusion.threshold must be in (0, 1], got {self.threshold}.")
        if self.threshold is not None and self.remasking != "low_confidence":
            raise ValueError("rollout.diffusion.threshold (parallel decoding) commits by confidence: it needs "
                             f"rollout.diffusion.remasking=low_confidence, got {self.remasking}.")
        return self
