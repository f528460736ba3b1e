"""The learner: data-parallel DeepSpeed ranks (ZeRO-2/3) that train on whatever loss they are given.

The learner knows nothing about the algorithm. A loss function is a picklable callable
`loss_fn(out: PolicyOutputs, mb: MicroBatch) -> (scalar, metrics)`. `out` holds the final hidden
states at the completion positions, the output layer's weight and the temperature (so that a loss
over a large vocabulary can work chunk by chunk, `rl.algorithms.divergences.chunked_divergence`), and
`out.logits()` for losses happy with materialised [B, T, V] float32 logits / temperature. The
scalar is this micro-batch's share of the step's GLOBAL loss (divided by `mb.loss_normalizer`), and
the metrics are sums (the learner adds `loss`, the sum of those scalars, itself). The gradient
applied is exactly d(sum of all micro-batch losses on all ranks)/d(theta), however the step is
split into micro-batches and ranks; see `LearnerWorker.train_step`.

A masked-diffusion model (`DiffusionForward`) runs whole instead: one forward on [prompt ; every
answer position masked] gives the logits at the answer positions (d1's one-step estimator), which
reach the loss as `out.hidden` with `out.lm_head_weight=None`.

A batch with a teacher view (OPSD) also gets a no-grad teacher forward on it per micro-batch,
aligned to the same completion tokens (`out.teacher_hidden`); the teacher settings' kind picks the
teacher: the frozen initial policy, the live policy, or an EMA copy. With `model.lora.enabled`
only peft adapters train, the frozen model is the same one with adapters disabled, and
`full_state_dict`/`save_hf` give merged weights under the base model's HF names.

`LearnerWorker` is one rank (usable in-process with world_size=1); `LearnerGroup` runs
`num_learners` of them as Ray actors.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch

from rl.learner.batch import MicroBatch, PolicyOutputs, SequenceBatch, plan_micro_batches
from rl.loop.checkpoint import rng_state, set_rng_state
from rl.config import LearnerConfig, LoraConfig
from rl.algorithms.entropy import chunked_entropy
from rl.algorithms.losses import chunked_token_logprobs

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEEPSPEED_TAG = "deepspeed"  # save_checkpoint's subfolder for DeepSpeed's own files
EMA_FILE = "ema_teacher.pt"


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): (step+1)/warmup_steps, then 1.

    Counting from step+1 means the first step already moves (a factor of 0 would waste it) and
    the peak is reached at step warmup_steps-1.
    """
    if warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def split_evenly(n: int, parts: int) -> list[list[int]]:
    """Indices 0..n-1 cut into `parts` contiguous runs whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def _deepspeed_config(cfg: LearnerConfig, dtype: str, world_size: int) -> dict:
    # Accumulation is driven by hand (a step's micro-batch count varies), so DeepSpeed's own
    # gradient_accumulation_steps stays 1 and never rescales the loss.
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        # check_grad_overflow: a non-finite gradient skips the step in bf16 too, as in fp32.
        "bf16": {"enabled": dtype == "bfloat16", "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _disable_dropout(model: torch.nn.Module) -> None:
    # Rollouts are sampled without dropout and importance ratios compare against them, so the
    # trained policy must be the same deterministic function. Train mode is kept (gradient
    # checkpointing only acts in train mode), hence zeroing rather than eval().
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _to_device(mb: MicroBatch, device: torch.device) -> MicroBatch:
    def move(fields: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in fields.items()}

    return dataclasses.replace(
        mb,
        input_ids=mb.input_ids.to(device),
        attention_mask=mb.attention_mask.to(device),
        prompt_lens=mb.prompt_lens.to(device),
        completion_ids=mb.completion_ids.to(device),
        completion_mask=mb.completion_mask.to(device),
        token_fields=move(mb.token_fields),
        seq_fields=move(mb.seq_fields),
        position_ids=None if mb.position_ids is None else mb.position_ids.to(device),
        predict_index=None if mb.predict_index is None else mb.predict_index.to(device),
    )


def _add_metrics(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + float(v)


# ---------------------------------------------------------------------------------------------
# The module DeepSpeed wraps


def _causal_lm(lm: torch.nn.Module) -> torch.nn.Module:
    """The HF causal LM itself, whether or not peft wraps it."""
    get_base = getattr(lm, "get_base_model", None)  # peft's; HF models have none
    return lm if get_base is None else get_base()


# Config attributes of architectures whose logits are more than hidden @ W^T.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _check_output_layer(causal_lm: torch.nn.Module) -> None:
    """Losses compute logits as hidden @ W^T themselves: refuse a model whose output layer is more."""
    head = causal_lm.get_output_embeddings()
    transforms = [k for k in _LOGIT_TRANSFORMS if getattr(causal_lm.config, k, None) not in (None, 1, 1.0)]
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
        deepspeed.zero.register_external_parameter(self.head, self.output_weight)

    @property
    def output_weight(self) -> torch.nn.Parameter:
        return _causal_lm(self.lm).get_output_embeddings().weight

    def forward(self, *, mb: MicroBatch, fn=None):
        body = _causal_lm(self.lm).get_decoder()
        if mb.is_packed:
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
    `trust_remote_code` loads models that ship their own code (LLaDA)."""

    answer_length: int
    mask_id: int
    prompt_mask_prob: float = 0.0
    trust_remote_code: bool = False


def masked_answer_input(mb: MicroBatch, settings: DiffusionForward, pad_id: int):
    """(ids, attention, completion positions [B, T]) of the one-step estimator's forward on `mb`.

    Prompt masking (`rollouts.diffusion.prompt_mask`) draws from the row's own tokens and its
    `mask_seed` (seq_fields, default 0): the policy, old-policy and reference forwards of one inner
    update see the same masked prompt, the diffusion engine's estimate and `score` (mask_seed 0)
    the same as the first update, and each inner update a fresh one (the trainer sets mask_seed to
    the update's index, as d1 does).
    """
    from rollouts.diffusion import MASK_SEED_FIELD, answer_layout, mask_prompts

    width = mb.completion_ids.shape[1]
    if width > settings.answer_length:
        raise ValueError(
            f"A completion of {width} tokens is longer than the masked answer ({settings.answer_length} "
            "positions = rollout.max_tokens) the estimator scores it in."
        )
    lens = mb.prompt_lens.tolist()
    prompts = [mb.input_ids[i, :p].tolist() for i, p in enumerate(lens)]
    ids, attention, positions = answer_layout(prompts, settings.answer_length, pad_id, settings.mask_id)
    if settings.prompt_mask_prob > 0:
        completions = [mb.input_ids[i, p : p + int(mb.completion_mask[i].sum())].tolist() for i, p in enumerate(lens)]
        seeds = mb.seq_fields.get(MASK_SEED_FIELD)
        seeds = [0] * len(lens) if seeds is None else [int(x) for x in seeds.tolist()]
        ids = mask_prompts(ids, prompts, completions, seeds, settings.prompt_mask_prob, settings.mask_id)
    device = mb.input_ids.device
    return ids.to(device), attention.to(device), positions[:, :width].to(device)


class _DiffusionPolicy(torch.nn.Module):
    """A masked-diffusion model's one-step forward -> `fn(answer logits, None)`, or the logits."""

    def __init__(self, lm: torch.nn.Module, settings: DiffusionForward, pad_id: int):
        super().__init__()
        self.lm, self.settings, self.pad_id = lm, settings, pad_id

    def forward(self, *, mb: MicroBatch, fn=None):
        ids, attention, positions = masked_answer_input(mb, self.settings, self.pad_id)
        logits = _causal_lm(self.lm)(input_ids=ids, attention_mask=attention).logits
        answer_logits = logits[torch.arange(ids.shape[0], device=ids.device)[:, None], positions]
        return answer_logits if fn is None else fn(answer_logits, None)


def _unwrap(module) -> _Policy:
    return module if isinstance(module, _Policy) else module.module


def _full_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's value without grad; under ZeRO-3 a gathered copy (it is partitioned outside forwards)."""
    import deepspeed

    if not hasattr(param, "ds_id"):
        return param.detach()
    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


def _call_loss(loss_fn, mb, temperature, teacher_hidden, teacher_weight, hidden, weight):
    out = PolicyOutputs(hidden, weight, temperature, teacher_hidden, teacher_weight)
    loss, metrics = loss_fn(out, mb)
    return loss, metrics, out.kept_logprobs


def _placeholder_loss(out: PolicyOutputs, mb: MicroBatch):
    # Touches every parameter, so that every rank's backward reduces the same gradients.
    return out.logits().sum() * 0.0, {}


def _rows(values: torch.Tensor, mb: MicroBatch) -> list[list[float]]:
    """[B, T] completion-aligned values -> one list per sequence, its completion's length long."""
    lens = mb.completion_mask.sum(-1).long().tolist()
    return [row[:n].tolist() for row, n in zip(values.cpu(), lens)]


def _token_scores(mb: MicroBatch, temperature: float, with_entropy: bool, hidden, weight):
    # Chunked over positions: never a [B, T, V] tensor, however long the completions.
    token_logp = chunked_token_logprobs(hidden, weight, mb.completion_ids, temperature)
    return token_logp, (chunked_entropy(hidden, weight, None, temperature) if with_entropy else None)


# ---------------------------------------------------------------------------------------------
# LoRA

ADAPTER = "default"  # peft's name for the one adapter


def _with_lora(model: torch.nn.Module, lora: LoraConfig, causal: bool = True) -> torch.nn.Module:
    """The model with trainable peft adapters on `lora.target_modules`; everything else frozen.
    A masked-diffusion model gets peft's plain wrapper: the causal-LM one expects generate()."""
    import peft

    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), task_type="CAUSAL_LM" if causal else None,
    )
    return peft.get_peft_model(model, config)


def _merged_lora_state(causal_lm: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft-injected model's state (HF-relative names) -> the plain HF model's: W + (alpha/r) B @ A
    for every adapted layer, `base_layer.` dropped from the names, no adapter tensors."""
    from peft.tuners.lora import LoraLayer

    merged = {}
    for name, layer in causal_lm.named_modules():
        if isinstance(layer, LoraLayer):
            a, b = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]
            delta = (b.float() @ a.float()) * layer.scaling[ADAPTER]
            weight = state[f"{name}.base_layer.weight"]
            # Merged in float32, so that a bf16 model rounds once, not at the product and again at the sum.
            delta = delta.T if layer.fan_in_fan_out else delta
            merged[f"{name}.base_layer.weight"] = (weight.float() + delta).to(weight.dtype)
    return {
        key.replace(".base_layer.", "."): merged.get(key, value)
        for key, value in state.items()
        if ".lora_" not in key
    }


# ---------------------------------------------------------------------------------------------


class LearnerWorker:
    """One data-parallel rank: a DeepSpeed engine over an HF causal LM (optionally with LoRA adapters),
    plus the frozen reference and the teacher copies it is asked for."""

    def __init__(
        self,
        model_path: str,
        learner_cfg: LearnerConfig,
        dtype: str,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        seed: int,
        total_steps: int,
        with_reference: bool = False,
        teacher=None,
        lora: LoraConfig | None = None,
        diffusion: DiffusionForward | None = None,
    ):
        """with_reference: keep the frozen initial policy (`compute_logprobs(reference=True)`).
        teacher: the teacher settings (OPSD's TeacherConfig) when batches carry a teacher view; keep
        what `teacher.kind` needs (frozen: the same reference; ema: an EMA copy; live: nothing).
        With LoRA the frozen model is the policy with adapters disabled.
        diffusion: the model is a masked-diffusion one, scored as `DiffusionForward` says."""
        import deepspeed

        if diffusion is not None and teacher is not None:
            raise ValueError("Teacher views (OPSD) are not supported for masked-diffusion models.")
        self.diffusion = diffusion

        self.cfg = learner_cfg
        self.teacher_cfg = teacher
        self.model_path = model_path
        self.rank = rank
        self.world_size = world_size
        self.lora = lora if lora is not None and lora.enabled else None
        self._init_distributed(master_addr, master_port)
        torch.manual_seed(seed)  # peft's adapter initialisation: the same on every rank
        if learner_cfg.warmup_steps > total_steps:
            logger.warning(
                "learner.warmup_steps=%d exceeds the run's %d steps: the lr never reaches its peak.",
                learner_cfg.warmup_steps, total_steps,
            )

        ds_config = _deepspeed_config(learner_cfg, dtype, world_size)
        model = self._load(model_path, dtype)
        if learner_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.lora is not None:
            model = _with_lora(model, self.lora, causal=diffusion is None)
        self.pad_id = _causal_lm(model).config.pad_token_id or 0
        if diffusion is None:
            _check_output_layer(_causal_lm(model))
        # Masked-diffusion models attend both ways: they stay on the padded layout, one row per
        # sequence, which their own forward rebuilds anyway (masked_answer_input).
        self.packed = diffusion is None and (learner_cfg.share_prompt or learner_cfg.max_tokens_per_micro_batch is not None)
        if self.packed and "sliding_attention" in (getattr(_causal_lm(model).config, "layer_types", None) or []):
            raise ValueError(
                "This model has sliding-window attention layers, which the packed layout's explicit 4D mask "
                "would override (every layer would see the full window). Set learner.share_prompt=false and "
                "leave learner.max_tokens_per_micro_batch unset for it."
            )
        teacher = teacher.kind if teacher is not None else None
        ema = copy.deepcopy(model) if teacher == "ema" else None
        policy = self._wrap(model)
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=learner_cfg.lr,
            betas=tuple(learner_cfg.betas), weight_decay=learner_cfg.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(warmup_factor, warmup_steps=learner_cfg.warmup_steps)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.device = self.engine.device
        frozen_copy = (with_reference or teacher == "frozen") and self.lora is None
        self.reference = self._frozen(self._load(model_path, dtype), ds_config) if frozen_copy else None
        self.ema = None if ema is None else self._frozen(ema, ds_config)
        self._ema_masters: dict[str, torch.Tensor] = {}

    def _init_distributed(self, master_addr: str, master_port: int) -> None:
        import deepspeed

        cuda = torch.cuda.is_available()
        # Under Ray each actor sees only its own GPU (index 0); launched by hand, all GPUs show.
        local_rank = self.rank % torch.cuda.device_count() if cuda else self.rank
        os.environ.update(
            RANK=str(self.rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(self.world_size),
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        )
        if cuda:
            torch.cuda.set_device(local_rank)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")

    def _load(self, model_path: str, dtype: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from rollouts.diffusion import load_masked_diffusion_model

        if self.diffusion is not None:
            model = load_masked_diffusion_model(model_path, DTYPES[dtype], self.diffusion.trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
        _disable_dropout(model)  # before peft: LoRA's own dropout stays as configured
        return model

    def _wrap(self, lm: torch.nn.Module) -> torch.nn.Module:
        return _Policy(lm) if self.diffusion is None else _DiffusionPolicy(lm, self.diffusion, self.pad_id)

    def _frozen(self, lm: torch.nn.Module, ds_config: dict):
        import deepspeed

        policy = self._wrap(lm.eval().requires_grad_(False))
        if self.cfg.zero_stage == 3:
            # Sharded like the policy, so a frozen copy costs 1/world_size of a model per rank.
            engine, *_ = deepspeed.initialize(model=policy, config=ds_config)
            return engine
        return policy.to(self.device)

    # ------------------------------------------------------------------ scoring models

    def _scorer(self, which: str):
        """(module, context) that scores as `which`: "policy", "reference" or a teacher kind."""
        if which in ("policy", "live"):
            return self.engine, nullcontext()
        if which == "ema":
            if self.ema is None:
                raise ValueError("An ema teacher needs the learner built with teacher settings of kind ema.")
            return self.ema, nullcontext()
        if self.lora is not None:
            return self.engine, self.engine.module.lm.disable_adapter()
        if self.reference is None:
            raise ValueError(
                f"Scoring with the frozen initial policy ({which}) needs the learner built with "
                "with_reference=True, or with a teacher of kind frozen."
            )
        return self.reference, nullcontext()

    @torch.no_grad()
    def _score(self, which: str, mb: MicroBatch, fn=None):
        """`which`'s forward on `mb` in eval mode: hidden states, or `fn(hidden, output weight)`."""
        module, context = self._scorer(which)
        training = module.training
        module.eval()
        try:
            with context:
                return module(mb=mb, fn=fn)
        finally:
            module.train(training)

    def _teacher_head_weight(self) -> torch.Tensor | None:
        """The teacher's output weight when it is another copy's (frozen or EMA), else None."""
        if self.teacher_cfg is None:
            raise ValueError(
                "This batch carries a teacher view, but the learner was built without teacher settings: "
                "pass the algorithm's teacher (its Requirements.teacher) as `teacher=`."
            )
        module, _ = self._scorer(self.teacher_cfg.kind)
        return None if module is self.engine else _full_weight(_unwrap(module).output_weight)

    @torch.no_grad()
    def _update_ema(self) -> None:
        """teacher <- decay * teacher + (1 - decay) * policy, over the parameters that train."""
        import deepspeed

        decay = self.teacher_cfg.ema_decay
        ema = dict(_unwrap(self.ema).lm.named_parameters())
        for name, p in self.engine.module.lm.named_parameters():
            if not p.requires_grad:
                continue
            q = ema[name]
            # modifier_rank=0: on leaving, rank 0's new value is re-partitioned to all (ZeRO-3).
            with deepspeed.zero.GatheredParameters([p]), deepspeed.zero.GatheredParameters([q], modifier_rank=0):
                master = self._ema_master(name, q)
                master.lerp_(p.detach().to(master.dtype), 1.0 - decay)
                if master is not q:
                    q.copy_(master)

    def _ema_master(self, name: str, q: torch.nn.Parameter) -> torch.Tensor:
        # A bf16 average would round away updates below ~0.4% of a weight (most of them, at RL
        # learning rates), so lower-precision copies follow a float32 master (whole on every rank,
        # ZeRO-3 included: the price of an EMA of a fully trained bf16 model).
        if q.dtype == torch.float32:
            return q
        if name not in self._ema_masters:
            self._ema_masters[name] = q.detach().float().clone()
        return self._ema_masters[name]

    # ------------------------------------------------------------------ micro-batching

    def _micro_batches(self, batch: SequenceBatch, count: int | None) -> list[tuple[MicroBatch, MicroBatch | None] | None]:
        """This rank's (micro-batch, its teacher view or None) pairs; None marks a placeholder forward
        run only to keep ranks in step.

        Every rank must run the same number of forwards and backwards (ZeRO-3 gathers parameters
        in them, ZeRO-2 reduces gradients in them), so a short shard is padded with placeholders.
        """
        chunks = plan_micro_batches(batch, self.cfg.micro_batch_size, self.cfg.max_tokens_per_micro_batch,
                                    self.cfg.share_prompt, count)
        if count is not None and len(chunks) > count:
            raise ValueError(f"{len(chunks)} micro-batches planned where every rank runs {count}.")
        return [self._prepare(batch.select(idx)) if idx else None for idx in chunks]

    def _tensors(self, sequences: SequenceBatch) -> MicroBatch:
        if self.packed:
            mb = MicroBatch.packed(sequences, self.pad_id, self.cfg.share_prompt)
        else:
            mb = MicroBatch.from_sequences(sequences, self.pad_id)
        return _to_device(mb, self.device)

    def _prepare(self, sequences: SequenceBatch) -> tuple[MicroBatch, MicroBatch | None]:
        mb = self._tensors(sequences)
        view = sequences.teacher_view()
        if view is None:
            return mb, None
        teacher = self._tensors(view)
        if not torch.equal(teacher.completion_ids, mb.completion_ids) or not torch.equal(
            teacher.completion_mask, mb.completion_mask
        ):
            raise ValueError(
                "The teacher view must end with the same completion tokens as the student's sequences: "
                "teacher_input_ids[i][teacher_prompt_lens[i]:] == input_ids[i][prompt_lens[i]:]."
            )
        return mb, teacher

    def _placeholder(self, with_teacher: bool) -> tuple[MicroBatch, MicroBatch | None]:
        mb = self._tensors(SequenceBatch(input_ids=[[self.pad_id, self.pad_id]], prompt_lens=[1]))
        return mb, (mb if with_teacher else None)

    # ------------------------------------------------------------------ public API

    def train_step(
        self,
        batch: SequenceBatch,
        loss_fn,
        temperature: float = 1.0,
        num_micro_batches: int | None = None,
        return_logprobs: bool = False,
    ):
        """Forward/backward every micro-batch, then one optimizer step (then the EMA teacher's update).

        A batch with a teacher view also gets, per micro-batch, a no-grad forward of the teacher
        (the `teacher` settings' kind) on its teacher sequences, passed on as `out.teacher_hidden`.

        Returns the loss_fn metrics summed over micro-batches, `loss` (the sum of the scalars
        differentiated, i.e. this rank's share of the step's global loss), `grad_norm` (before
        clipping), `lr` (the one this step used) and `update_skipped` (1 when a non-finite loss or
        gradient norm made DeepSpeed skip the optimizer step on every rank, else 0). With
        `return_logprobs`: (those metrics, the per-token log-probs the loss kept with
        `out.keep_logprobs`, in batch order), i.e. the policy's scores before this update, without a
        forward of their own.
        """
        self.engine.train()
        micro = self._micro_batches(batch, num_micro_batches)
        with_teacher = batch.teacher_input_ids is not None
        teacher_weight = self._teacher_head_weight() if with_teacher else None
        metrics: dict[str, float] = {}
        logprobs: list[list[float]] = []
        for i, pair in enumerate(micro):
            # The boundary (reduction bookkeeping, then step) is the last micro-batch, whatever
            # the count; DeepSpeed's fixed gradient_accumulation_steps cannot express that.
            self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            mb, teacher_mb = pair or self._placeholder(with_teacher)
            teacher_hidden = None if teacher_mb is None else self._score(self.teacher_cfg.kind, teacher_mb)
            loss_or_placeholder = loss_fn if pair else _placeholder_loss
            fn = partial(_call_loss, loss_or_placeholder, mb, temperature, teacher_hidden, teacher_weight)
            loss, part, kept = self.engine(mb=mb, fn=fn)
            if pair:
                _add_metrics(metrics, {**part, "loss": loss.item()})
                if return_logprobs:
                    if kept is None:
                        raise ValueError(
                            "train_step(return_logprobs=True) needs a loss that hands its token log-probs "
                            "back with out.keep_logprobs(logp); this loss does not."
                        )
                    logprobs += _rows(kept, mb)
                if not torch.isfinite(loss):
                    # NaN gradients make DeepSpeed's own overflow check (agreed over ranks) skip the
                    # step and clear its gradient buffers: a finite gradient from a non-finite loss
                    # (a NaN that entered as a constant) must not be applied either.
                    loss = loss * float("nan")
            # Data parallelism AVERAGES gradients over ranks; the loss is already a share of the
            # global sum, so scaling by world_size turns that average back into the sum.
            # scale_wrt_gas=False: the micro-batch losses are summed, not averaged.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        lr = self.engine.get_lr()[0]
        self.engine.step()
        if self.ema is not None:
            self._update_ema()
        skipped = not self.engine.was_step_applied()  # a non-finite gradient norm: no update made
        metrics = {**metrics, "grad_norm": float(self.engine.get_global_grad_norm()), "lr": lr, "update_skipped": float(skipped)}
        return (metrics, logprobs) if return_logprobs else metrics

    @torch.no_grad()
    def compute_logprobs(
        self,
        batch: SequenceBatch,
        temperature: float = 1.0,
        with_entropy: bool = False,
        reference: bool = False,
        num_micro_batches: int | None = None,
    ) -> tuple[list[list[float]], list[list[float]] | None]:
        """Per completion token: log_softmax(logits/T) at the token, and optionally the entropy."""
        which = "reference" if reference else "policy"
        logprobs: list[list[float]] = []
        entropies: list[list[float]] = []
        for pair in self._micro_batches(batch, num_micro_batches):
            mb = pair[0] if pair else self._placeholder(False)[0]
            token_logp, ent = self._score(which, mb, partial(_token_scores, mb, temperature, with_entropy))
            if not pair:
                continue
            logprobs += _rows(token_logp, mb)
            if with_entropy:
                entropies += _rows(ent, mb)
        return logprobs, (entropies if with_entropy else None)

    def _gather_cpu(self) -> dict[int, torch.Tensor]:
        """Every policy parameter as a CPU tensor on rank 0, by id ({} elsewhere); a collective call.

        One parameter at a time, so that ZeRO-3 never holds the whole model on the accelerator.
        """
        import deepspeed

        gathered: dict[int, torch.Tensor] = {}
        for p in self.engine.module.parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.rank == 0:
                    gathered[id(p)] = p.detach().to("cpu", copy=True)
        return gathered

    @staticmethod
    def _state_on_cpu(module: torch.nn.Module, gathered: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Tied weights stay one shared tensor under both names, as in module.state_dict().
        return {
            name: gathered[id(t)] if id(t) in gathered else t.detach().to("cpu", copy=True)
            for name, t in module.state_dict(keep_vars=True).items()
        }

    def _hf_state(self, gathered: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        causal_lm = _causal_lm(self.engine.module.lm)
        state = self._state_on_cpu(causal_lm, gathered)
        return state if self.lora is None else _merged_lora_state(causal_lm, state)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF model's full state dict as CPU tensors on rank 0 ({} elsewhere); a collective call.

        With LoRA: the merged weights W + (alpha/r) B @ A under the base model's HF names, what
        the engines load.
        """
        gathered = self._gather_cpu()
        return self._hf_state(gathered) if self.rank == 0 else {}

    def save_hf(self, out_dir: str, adapter: bool = False) -> None:
        """Write an HF folder (config, safetensors, tokenizer; with LoRA the merged model) on rank 0,
        and with `adapter=True` the peft adapter alone in out_dir/adapter; a collective call."""
        from transformers import AutoTokenizer

        if adapter and self.lora is None:
            raise ValueError("save_hf(adapter=True) needs model.lora.enabled.")
        gathered = self._gather_cpu()
        if self.rank != 0:
            return
        lm = self.engine.module.lm
        _causal_lm(lm).save_pretrained(out_dir, state_dict=self._hf_state(gathered))
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)
        if adapter:
            lm.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=self._state_on_cpu(lm, gathered))

    # ------------------------------------------------------------------ run-state checkpoints

    def save_checkpoint(self, out_dir: str) -> None:
        """This rank's training state into out_dir (shared by all ranks); a collective call.

        DeepSpeed's checkpoint (weights, optimizer, lr schedule; with LoRA only the adapters: the
        frozen base is the model's own), this rank's RNG states, and the EMA teacher's moving weights.
        """
        self.engine.save_checkpoint(out_dir, tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        torch.save(rng_state(), os.path.join(out_dir, f"rng_rank{self.rank}.pt"))
        if self.ema is not None:
            ema = self._ema_state()
            if self.rank == 0:
                torch.save(ema, os.path.join(out_dir, EMA_FILE))

    def load_checkpoint(self, in_dir: str) -> None:
        """Restore what save_checkpoint wrote, on ranks built as the saving ones; a collective call."""
        path, _ = self.engine.load_checkpoint(in_dir, tag=DEEPSPEED_TAG, load_module_strict=self.lora is None)
        if path is None:
            raise FileNotFoundError(f"No DeepSpeed checkpoint in {os.path.join(in_dir, DEEPSPEED_TAG)}.")
        set_rng_state(torch.load(os.path.join(in_dir, f"rng_rank{self.rank}.pt"), weights_only=False))
        if self.ema is not None:
            self._load_ema(torch.load(os.path.join(in_dir, EMA_FILE)))

    def _ema_moving(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The EMA teacher's parameters that follow the policy's (the trained ones); the rest stay initial."""
        ema = dict(_unwrap(self.ema).lm.named_parameters())
        return [(name, ema[name]) for name, p in self.engine.module.lm.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def _ema_state(self) -> dict[str, torch.Tensor]:
        """The moving EMA weights on rank 0, as their float32 masters where kept; a collective call."""
        import deepspeed

        state = {}
        for name, q in self._ema_moving():
            with deepspeed.zero.GatheredParameters([q]):
                if self.rank == 0:
                    state[name] = self._ema_masters.get(name, q.detach()).to("cpu", copy=True)
        return state

    @torch.no_grad()
    def _load_ema(self, state: dict[str, torch.Tensor]) -> None:
        import deepspeed

        for name, q in self._ema_moving():
            if q.dtype != torch.float32:
                self._ema_masters[name] = state[name].float().to(self.device)
            with deepspeed.zero.GatheredParameters([q], modifier_rank=0):
                q.copy_(state[name])


# ---------------------------------------------------------------------------------------------


RANK_AGREED = ("grad_norm", "lr", "update_skipped")  # the same on every rank: not summed


class LearnerRankError(RuntimeError):
    """A learner rank failed or died; the others may be stuck in a collective with it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LearnerGroup:
    """`learner_cfg.num_learners` LearnerWorker ranks as Ray actors; the caller has run ray.init."""

    def __init__(
        self,
        model_path: str,
        learner_cfg: LearnerConfig,
        dtype: str,
        seed: int,
        total_steps: int,
        with_reference: bool = False,
        teacher=None,
        lora: LoraConfig | None = None,
        diffusion: DiffusionForward | None = None,
        placement=None,
    ):
        """Arguments as LearnerWorker's. `placement` (rl.loop.placement's applied ResourcePlan): rank r runs
        in the plan's learner slot r, and the ranks meet at rank 0's node address; without one, each
        rank reserves learner_cpus (and a GPU where the cluster has some) and they meet on this host."""
        import ray

        self.cfg = learner_cfg
        n = learner_cfg.num_learners
        if placement is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
            options = [dict(num_cpus=learner_cfg.learner_cpus, num_gpus=gpus)] * n
            address, port = "127.0.0.1", free_port()
        else:
            options = [placement.actor_options(slot) for slot in sorted(placement.learners, key=lambda s: s.rank)]
            address, port = placement.master_address()
        self.workers = [
            ray.remote(**options[rank])(LearnerWorker).remote(
                model_path, learner_cfg, dtype, rank, n, address, port, seed, total_steps,
                with_reference, teacher, lora, diffusion,
            )
            for rank in range(n)
        ]
        # Actors are constructed concurrently; DeepSpeed's init returns once all ranks joined.
        self._wait([w.__ray_ready__.remote() for w in self.workers], "init")

    def _wait(self, refs: list, what: str) -> list:
        """Results in rank order; the first failing rank raises at once, since the others may
        be blocked in a collective waiting for it."""
        import ray

        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[rank_of[ref]] = ray.get(ref)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                raise LearnerRankError(
                    f"learner rank {rank_of[ref]} of {len(refs)} failed in {what}: {type(cause).__name__}: {cause}"
                ) from e
        return results

    def _shards(self, batch: SequenceBatch) -> tuple[list[SequenceBatch], int]:
        """Contiguous per-rank shards and the micro-batch count every rank runs (set by the largest)."""
        c = self.cfg
        shards = [batch.select(p) for p in split_evenly(len(batch), len(self.workers))]
        count = max(
            len([run for run in plan_micro_batches(s, c.micro_batch_size, c.max_tokens_per_micro_batch, c.share_prompt) if run])
            for s in shards
        )
        return shards, max(1, count)

    def train_step(self, batch: SequenceBatch, loss_fn, temperature: float = 1.0, return_logprobs: bool = False):
        """One optimizer step on the whole batch: metrics (with `loss`, the step's global loss) summed
        over ranks, grad_norm, lr and update_skipped of rank 0 (every rank has the same); with
        `return_logprobs` also the loss's kept token log-probs of the whole batch in input order
        (LearnerWorker.train_step)."""
        shards, count = self._shards(batch)
        refs = [w.train_step.remote(s, loss_fn, temperature, count, return_logprobs) for w, s in zip(self.workers, shards)]
        results = self._wait(refs, "train_step")
        parts = [r[0] for r in results] if return_logprobs else results
        metrics: dict[str, float] = {}
        for r in parts:
            _add_metrics(metrics, {k: v for k, v in r.items() if k not in RANK_AGREED})
        metrics = {**metrics, **{k: parts[0][k] for k in RANK_AGREED}}
        return (metrics, [row for r in results for row in r[1]]) if return_logprobs else metrics

    def compute_logprobs(
        self,
        batch: SequenceBatch,
        temperature: float = 1.0,
        with_entropy: bool = False,
        reference: bool = False,
    ) -> tuple[list[list[float]], list[list[float]] | None]:
        """Per-token logprobs (and entropies) of the whole batch, in input order."""
        shards, count = self._shards(batch)
        refs = [
            w.compute_logprobs.remote(s, temperature, with_entropy, reference, count)
            for w, s in zip(self.workers, shards)
        ]
        results = self._wait(refs, "compute_logprobs")
        logprobs = [row for lp, _ in results for row in lp]
        entropies = [row for _, ent in results for row in ent] if with_entropy else None
        return logprobs, entropies

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self._wait([w.full_state_dict.remote() for w in self.workers], "full_state_dict")[0]

    def submit(self, fn, *args) -> list:
        """Start fn(worker, *args) in every rank's actor without waiting (weight export: the
        collective weight sync, rl.sync.weight_sync); `wait` collects the results in rank order."""
        return [w.__ray_call__.remote(fn, *args) for w in self.workers]

    def wait(self, refs: list, what: str) -> list:
        return self._wait(refs, what)

    def save_hf(self, out_dir: str, adapter: bool = False) -> None:
        self._wait([w.save_hf.remote(out_dir, adapter) for w in self.workers], "save_hf")

    def save_checkpoint(self, out_dir: str) -> None:
        """Every rank's training state into out_dir (LearnerWorker.save_checkpoint)."""
        self._wait([w.save_checkpoint.remote(out_dir) for w in self.workers], "save_checkpoint")

    def load_checkpoint(self, in_dir: str) -> None:
        self._wait([w.load_checkpoint.remote(in_dir) for w in self.workers], "load_checkpoint")

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
