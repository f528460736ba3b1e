"""One learner rank (`LearnerWorker`): builds the parts (rl.learner.model, lora, frozen,
micro_batches, step, export) around one DeepSpeed engine, and is what a Ray actor runs."""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from rl.config import LearnerConfig, LoraConfig
from rl.core.batch import SequenceBatch
from rl.learner.export import StateExport
from rl.learner.frozen import FrozenModels, freeze
from rl.learner.micro_batches import MicroBatcher, packed_layout
from rl.learner.model import DiffusionForward, causal_lm, build_model, load_model, wrap
from rl.learner.step import StepRunner

logger = logging.getLogger(__name__)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): (step+1)/warmup_steps, then 1.

    Counting from step+1 means the first step already moves (a factor of 0 would waste it) and
    the peak is reached at step warmup_steps-1.
    """
    if warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def _deepspeed_config(cfg: LearnerConfig, dtype: str, world_size: int) -> dict:
    # Accumulation is driven by hand (a step's micro-batch count varies), so DeepSpeed's own
    # gradient_accumulation_steps stays 1 and never rescales the loss.
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        # One rank has nothing to shard, and stage 2 then only costs: it copies every gradient into
        # its reduction buckets after each micro-batch (about 1 s a step on the default task, 6% of
        # the learner), where stage 1 accumulates in place. Same optimizer, same update.
        "zero_optimization": {"stage": 1 if world_size == 1 and cfg.zero_stage == 2 else cfg.zero_stage},
        # check_grad_overflow: a non-finite gradient skips the step in bf16 too, as in fp32.
        "bf16": {"enabled": dtype == "bfloat16", "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    import deepspeed

    cuda = torch.cuda.is_available()
    # Under Ray each actor sees only its own GPU (index 0); launched by hand, all GPUs show.
    local_rank = rank % torch.cuda.device_count() if cuda else rank
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
    )
    if cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")


def teacher_model(path: str, dtype: str, vocab_rows: int, diffusion: DiffusionForward | None = None) -> torch.nn.Module:
    """Another model as teacher (OPSD's teacher kind "model"), of the student's kind (a masked-diffusion
    one with `diffusion`): `path` named as model.path names a model, its output layer as many rows as
    the student's (the launch already compared tokenizers)."""
    from rl.models import ModelError, resolve_model_path, vocab_size

    folder = resolve_model_path(path)
    lm = load_model(folder, dtype, diffusion)
    rows = vocab_size(folder) if diffusion is not None else causal_lm(lm).get_output_embeddings().weight.shape[0]
    if rows != vocab_rows:
        raise ModelError(
            f"The teacher {path} has {rows} output rows, the student {vocab_rows}: the divergence compares their "
            "distributions entry by entry, so both need the same (padded) vocabulary size."
        )
    return lm


@dataclass
class WeightSource:
    """A learner rank as a weight transport sees it (rl.sync.weight_sync): `weights()` walks the
    weights the engines load, as (HF name, tensor) pairs (a collective call under ZeRO-3: every rank
    walks them), on `device`; `state` is a dict kept in the rank's process for the transport."""

    rank: int
    device: torch.device
    weights: Callable
    state: dict


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
        plugins: list[str] | None = None,
    ):
        """with_reference: keep the frozen initial policy (`compute_logprobs(reference=True)`).
        teacher: the teacher settings (OPSD's TeacherConfig) when batches carry a teacher view; keep
        what `teacher.kind` needs (frozen: the same reference; ema: an EMA copy; live: nothing; model:
        a frozen copy of `teacher.path`, sharded like the reference).
        With LoRA the frozen model is the policy with adapters disabled.
        diffusion: the model is a masked-diffusion one, scored as `DiffusionForward` says; a teacher view is
        then scored the same way (its prompt, then the masked answer), by a teacher of the same kind.
        plugins: the config's `plugins` (rl.core.plugins), imported first."""
        import deepspeed

        from rl.core.plugins import import_plugins
        from rl.models import vocab_size

        import_plugins(list(plugins or []))  # what the config's plug-ins register, in this process too
        self.rank = rank
        self.lora = lora if lora is not None and lora.enabled else None
        _init_distributed(rank, world_size, master_addr, master_port)
        torch.manual_seed(seed)  # peft's adapter initialisation: the same on every rank
        if learner_cfg.warmup_steps > total_steps:
            logger.warning(
                "learner.warmup_steps=%d exceeds the run's %d steps: the lr never reaches its peak.",
                learner_cfg.warmup_steps, total_steps,
            )

        ds_config = _deepspeed_config(learner_cfg, dtype, world_size)
        model, pad_id = build_model(model_path, dtype, learner_cfg, self.lora, diffusion)
        packed = packed_layout(learner_cfg, causal_lm(model), diffusion is not None)
        vocab_rows = causal_lm(model).get_output_embeddings().weight.shape[0] if diffusion is None else vocab_size(model_path)
        teacher_kind = teacher.kind if teacher is not None else None
        ema = copy.deepcopy(model) if teacher_kind == "ema" else None
        policy = wrap(model, diffusion, pad_id)
        # fused: one pass over the parameters and states instead of one per arithmetic op (0.08 s
        # against 0.3 s for SmolLM2-135M on 2 CPU cores; CUDA has the same kernel).
        optimizer = torch.optim.AdamW(
            [p for p in policy.parameters() if p.requires_grad], lr=learner_cfg.lr,
            betas=tuple(learner_cfg.betas), weight_decay=learner_cfg.weight_decay, fused=True,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(warmup_factor, warmup_steps=learner_cfg.warmup_steps)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.device = self.engine.device

        def frozen_copy(lm: torch.nn.Module):
            return freeze(wrap(lm, diffusion, pad_id), learner_cfg, ds_config, self.device)

        reference = None
        if (with_reference or teacher_kind == "frozen") and self.lora is None:
            reference = frozen_copy(load_model(model_path, dtype, diffusion))
        external = None if teacher_kind != "model" else frozen_copy(teacher_model(teacher.path, dtype, vocab_rows, diffusion))
        self.frozen = FrozenModels(self.engine, learner_cfg, teacher, self.lora is not None, reference,
                                   None if ema is None else frozen_copy(ema), rank, self.device, external)
        batcher = MicroBatcher(learner_cfg, pad_id, packed, self.device)
        self.steps = StepRunner(self.engine, batcher, self.frozen, teacher_kind, world_size)
        self.state = StateExport(self.engine, self.frozen, rank, self.lora is not None, model_path)
        self.weight_source = WeightSource(rank, self.device, self.state.engine_weights, {})

    @property
    def reference(self):
        """The frozen initial policy's own copy, or None (not asked for, or LoRA: adapters disabled)."""
        return self.frozen.reference

    # The calls a LearnerGroup makes (Ray actor methods); documented where they are implemented.

    def train_step(self, batch: SequenceBatch, loss_fn, temperature: float = 1.0,
                   num_micro_batches: int | None = None, return_logprobs: bool = False):
        """One optimizer step on this rank's shard (`StepRunner.train_step`)."""
        return self.steps.train_step(batch, loss_fn, temperature, num_micro_batches, return_logprobs)

    def compute_logprobs(self, batch: SequenceBatch, temperature: float = 1.0, with_entropy: bool = False,
                         reference: bool = False, num_micro_batches: int | None = None):
        """Per completion token log-probs (and entropies) of this rank's shard (`StepRunner.compute_logprobs`)."""
        return self.steps.compute_logprobs(batch, temperature, with_entropy, reference, num_micro_batches)

    def checkpoint_bytes(self) -> int:
        """The estimated size of this rank's share of a checkpoint (`StateExport.checkpoint_bytes`)."""
        return self.state.checkpoint_bytes()

    def weight_work(self, fn, *args):
        """fn(WeightSource, *args): a weight transport's learner side (rl.sync.weight_sync)."""
        return fn(self.weight_source, *args)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF weights on rank 0 (`StateExport.full_state_dict`)."""
        return self.state.full_state_dict()

    def save_hf(self, out_dir: str, adapter: bool = False) -> None:
        self.state.save_hf(out_dir, adapter)

    def save_checkpoint(self, out_dir: str) -> None:
        self.state.save_checkpoint(out_dir)

    def load_checkpoint(self, in_dir: str) -> None:
        self.state.load_checkpoint(in_dir)
