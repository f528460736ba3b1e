"""The module DeepSpeed wraps: an HF model's body, run so that losses get hidden states and the
output weight instead of [B, L, V] logits (`_Policy`), or a masked-diffusion model's one-step
forward (`_DiffusionPolicy`); and how a model is loaded for it."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.config import LearnerConfig, LoraConfig
from rl.learner.attention import use_piece_attention
from rl.core.batch import MicroBatch
from rl.learner.lora import with_lora

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _disable_dropout(model: torch.nn.Module) -> None:
    # Rollouts are sampled without dropout and importance ratios compare against them, so the
    # trained policy must be the same deterministic function. Train mode is kept (gradient
    # checkpointing only acts in train mode), hence zeroing rather than eval().
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def causal_lm(lm: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM itself, whether or not peft wraps it."""
    get_base = getattr(lm, "get_base_model", None)  # peft's; HF models have none
    return lm if get_base is None else get_base()


# Config attributes of architectures whose logits are more than hidden @ W^T.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _check_output_layer(lm: torch.nn.Module) -> None:
    """Losses compute logits as hidden @ W^T themselves: refuse a model whose output layer is more."""
    head = lm.get_output_embeddings()
    transforms = [k for k in _LOGIT_TRANSFORMS if getattr(lm.config, k, None) not in (None, 1, 1.0)]
    if type(head) is not torch.nn.Linear or head.bias is not None or transforms:
        raise ValueError(
            f"The learner computes logits as hidden @ lm_head.weight^T, but this model's output layer is a "
            f"{type(head).__name__} (bias: {getattr(head, 'bias', None) is not None}, logit transforms: "
            f"{transforms or 'none'}). Use a model with a plain bias-free output layer, and keep the "
            "output layer out of model.lora.target_modules."
        )


class _Head(torch.nn.Module):
    """Calls `fn(hidden, weight)` as a module of its own, for ZeRO-3.

    ZeRO-3 holds a parameter whole only within the forward and backward of a module that uses it,
    and the learner never runs the output layer's own module. Registered here as an external
    parameter (DeepSpeed's documented way, rather than its guess when some forward reads a
    foreign parameter), the output weight is gathered around this forward and again around its
    backward, so a loss that multiplies by it chunk by chunk, even in its own backward
    (`chunked_divergence`), sees the full weight, and the gradient it returns reaches the
    partitioned parameter. Without ZeRO-3 this is a plain call. `hidden` is positional so that
    DeepSpeed sees it and releases the weight once the gradient has passed back through it.
    """

    def forward(self, hidden: torch.Tensor, *, weight: torch.nn.Parameter, fn):
        return fn(hidden, weight)


class _Policy(torch.nn.Module):
    """Decoder body -> hidden states at the completion positions -> `fn(hidden, output weight)`.

    The body instead of the whole causal LM, so that [B, L, V] logits are never built: losses get
    hidden states and the output weight, and only `PolicyOutputs.logits()` makes logits (for the
    T completion positions). With `fn=None` the forward returns the hidden states (teacher).
    """

    def __init__(self, lm: torch.nn.Module):
        import deepspeed

        super().__init__()
        self.lm = lm  # the HF causal LM, or the peft model around it
        self.head = _Head()
        self.piece_attention = use_piece_attention(causal_lm(lm))
        deepspeed.zero.register_external_parameter(self.head, self.output_weight)

    @property
    def output_weight(self) -> torch.nn.Parameter:
        return causal_lm(self.lm).get_output_embeddings().weight

    def forward(self, *, mb: MicroBatch, fn=None):
        body = causal_lm(self.lm).get_decoder()
        if mb.is_packed and self.piece_attention:
            # The 4D mask only stands in for HF's own mask building; piece attention uses the spans.
            out = body(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                       use_cache=False, attention_pieces=mb.attention_pieces)
        elif mb.is_packed:
            # A 4D mask reaches the attention as it is (HF skips its own mask building); additive
            # rather than bool, which SDPA and eager attention both take.
            dtype = self.output_weight.dtype
            bias = torch.zeros(mb.attention_mask.shape, dtype=dtype, device=mb.attention_mask.device)
            bias.masked_fill_(~mb.attention_mask, torch.finfo(dtype).min)
            out = body(input_ids=mb.input_ids, attention_mask=bias, position_ids=mb.position_ids, use_cache=False)
        else:
            out = body(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        hidden = mb.completion_aligned(out.last_hidden_state)
        return hidden if fn is None else self.head(hidden, weight=self.output_weight, fn=fn)


@dataclass(frozen=True)
class DiffusionForward:
    """How a masked-diffusion model is scored: `answer_length` masked answer positions after the
    prompt (the rollouts' length, so that the estimator sees what the sampler started from),
    `mask_id`, and d1's random prompt masking with probability `prompt_mask_prob`.
    `trust_remote_code` loads models that ship their own code (LLaDA). `estimator` (rollouts.estimators)
    and `estimator_samples`: the algorithm's likelihood estimator, run by the training forward and
    Learner.score with the same random draws as the diffusion engine's."""

    answer_length: int
    mask_id: int
    prompt_mask_prob: float = 0.0
    trust_remote_code: bool = False
    estimator: str = "one_step"
    estimator_samples: int = 1


def masked_answer_input(mb: MicroBatch, settings: DiffusionForward, pad_id: int):
    """(ids, attention, completion positions [B, T]) of the one-step estimator's forward on `mb`.

    Prompt masking (`rollouts.diffusion.prompt_mask`) draws from the row's own tokens and its
    `mask_seed` (seq_fields, default 0): the policy, old-policy and reference forwards of one inner
    update see the same masked prompt, the diffusion engine's estimate and `score` (mask_seed 0)
    the same as the first update, and each inner update a fresh one (the trainer sets mask_seed to
    the update's index, as d1 does).
    """
    from rollouts.diffusion import answer_layout, mask_prompts

    width = mb.completion_ids.shape[1]
    if width > settings.answer_length:
        raise ValueError(
            f"A completion of {width} tokens is longer than the masked answer ({settings.answer_length} "
            "positions = rollout.max_tokens) the estimator scores it in."
        )
    prompts, completions, seeds = _rows_of(mb)
    ids, attention, positions = answer_layout(prompts, settings.answer_length, pad_id, settings.mask_id)
    if settings.prompt_mask_prob > 0:
        ids = mask_prompts(ids, prompts, completions, seeds, settings.prompt_mask_prob, settings.mask_id)
    device = mb.input_ids.device
    return ids.to(device), attention.to(device), positions[:, :width].to(device)


class _DiffusionPolicy(torch.nn.Module):
    """A masked-diffusion model's estimator forward -> `fn(answer logits, None)` (one-step), or the
    one-step logits; an estimator of several forwards -> `fn(first pass's logits, None,
    estimator_passes=((logits, weights), ...))`, or those passes themselves (fn None)."""

    def __init__(self, lm: torch.nn.Module, settings: DiffusionForward, pad_id: int):
        super().__init__()
        self.lm, self.settings, self.pad_id = lm, settings, pad_id

    def forward(self, *, mb: MicroBatch, fn=None):
        ids, attention, positions = masked_answer_input(mb, self.settings, self.pad_id)
        lm = causal_lm(self.lm)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None]
        if self.settings.estimator == "one_step":
            answer_logits = lm(input_ids=ids, attention_mask=attention).logits[rows, positions]
            return answer_logits if fn is None else fn(answer_logits, None)
        from rollouts.estimators.common import with_answer

        passes = []
        for masked, weight in estimator_passes(mb, self.settings):
            answer = with_answer(ids, positions, mb.completion_ids, masked.to(ids.device), self.settings.mask_id)
            passes.append((lm(input_ids=answer, attention_mask=attention).logits[rows, positions], weight.to(ids.device)))
        # fn None: a teacher's forward; its passes mask what the student's mask (the draws depend on
        # the completion, not the prompt: rollouts.estimators.rows.row_generator).
        return tuple(passes) if fn is None else fn(passes[0][0], None, estimator_passes=tuple(passes))


def _rows_of(mb: MicroBatch) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """(prompts, completions, d1 mask seeds) of a micro-batch's rows, as the diffusion engine sees them."""
    from rollouts.diffusion import MASK_SEED_FIELD

    lens = mb.prompt_lens.tolist()
    prompts = [mb.input_ids[i, :p].tolist() for i, p in enumerate(lens)]
    completions = [mb.input_ids[i, p : p + int(mb.completion_mask[i].sum())].tolist() for i, p in enumerate(lens)]
    seeds = mb.seq_fields.get(MASK_SEED_FIELD)
    return prompts, completions, [0] * len(lens) if seeds is None else [int(x) for x in seeds.tolist()]


def estimator_passes(mb: MicroBatch, settings: DiffusionForward) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The estimator's passes over a micro-batch, drawn per sequence exactly as the diffusion engine
    drew them (rollouts.estimators.rows.stacked_passes)."""
    from rollouts.estimators.rows import stacked_passes

    prompts, completions, seeds = _rows_of(mb)
    return stacked_passes(settings.estimator, prompts, completions, seeds, n=settings.estimator_samples,
                          width=mb.completion_ids.shape[1])


def unwrap(module) -> _Policy | _DiffusionPolicy:
    """The policy module inside a DeepSpeed engine (or the module itself)."""
    return module if isinstance(module, (_Policy, _DiffusionPolicy)) else module.module


def is_diffusion(module) -> bool:
    return isinstance(unwrap(module), _DiffusionPolicy)


def load_model(model_path: str, dtype: str, diffusion: DiffusionForward | None) -> torch.nn.Module:
    """The HF model at model_path in `dtype`, dropout off (a masked-diffusion one when `diffusion`)."""
    from transformers import AutoModelForCausalLM

    from rollouts.diffusion import load_masked_diffusion_model

    if diffusion is not None:
        model = load_masked_diffusion_model(model_path, DTYPES[dtype], diffusion.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
    _disable_dropout(model)  # before peft: LoRA's own dropout stays as configured
    return model


def wrap(lm: torch.nn.Module, diffusion: DiffusionForward | None, pad_id: int) -> torch.nn.Module:
    """The module DeepSpeed (or a frozen copy) runs around the HF model `lm`."""
    return _Policy(lm) if diffusion is None else _DiffusionPolicy(lm, diffusion, pad_id)


def build_model(model_path: str, dtype: str, cfg: LearnerConfig, lora: LoraConfig | None,
                diffusion: DiffusionForward | None) -> tuple[torch.nn.Module, int]:
    """(the HF model to train, with peft adapters when `lora`; its pad token id)."""
    model = load_model(model_path, dtype, diffusion)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        model = with_lora(model, lora, causal=diffusion is None)
    if diffusion is None:
        _check_output_layer(causal_lm(model))
    return model, causal_lm(model).config.pad_token_id or 0
