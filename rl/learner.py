"""The learner: data-parallel DeepSpeed ranks (ZeRO-2/3) that train on whatever loss they are given.

The learner knows nothing about the algorithm. A loss function is a picklable callable
`loss_fn(logits, mb) -> (scalar, metrics)`: `logits` are the float32 completion-aligned logits
already divided by the temperature, the scalar is this micro-batch's share of the step's GLOBAL
loss (divided by `mb.loss_normalizer`), and the metrics are sums (the learner adds `loss`, the
sum of those scalars, itself). The gradient applied is exactly
d(sum of all micro-batch losses on all ranks)/d(theta), however the step is split into
micro-batches and ranks; see `LearnerWorker.train_step`.

`LearnerWorker` is one rank (usable in-process with world_size=1); `LearnerGroup` runs
`num_learners` of them as Ray actors.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
from functools import partial

import torch

from rl.batch import MicroBatch, SequenceBatch
from rl.config import LearnerConfig

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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
        "bf16": {"enabled": dtype == "bfloat16"},
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
    )


def _add_metrics(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + float(v)


class LearnerWorker:
    """One data-parallel rank: a DeepSpeed engine over an HF causal LM, plus an optional frozen reference."""

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
    ):
        import deepspeed

        self.cfg = learner_cfg
        self.model_path = model_path
        self.rank = rank
        self.world_size = world_size
        self._init_distributed(master_addr, master_port)
        torch.manual_seed(seed)
        if learner_cfg.warmup_steps > total_steps:
            logger.warning(
                "learner.warmup_steps=%d exceeds the run's %d steps: the lr never reaches its peak.",
                learner_cfg.warmup_steps, total_steps,
            )

        ds_config = _deepspeed_config(learner_cfg, dtype, world_size)
        model = self._load(model_path, dtype)
        if learner_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=learner_cfg.lr, betas=tuple(learner_cfg.betas),
            weight_decay=learner_cfg.weight_decay,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(warmup_factor, warmup_steps=learner_cfg.warmup_steps)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.device = self.engine.device
        self.pad_id = model.config.pad_token_id or 0
        self.reference = self._frozen_reference(model_path, dtype, ds_config) if with_reference else None

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

    @staticmethod
    def _load(model_path: str, dtype: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
        _disable_dropout(model)
        return model

    def _frozen_reference(self, model_path: str, dtype: str, ds_config: dict):
        import deepspeed

        ref = self._load(model_path, dtype).eval().requires_grad_(False)
        if self.cfg.zero_stage == 3:
            # Sharded like the policy, so the reference costs 1/world_size of a model per rank.
            engine, *_ = deepspeed.initialize(model=ref, config=ds_config)
            return engine
        return ref.to(self.device)

    # ------------------------------------------------------------------ micro-batching

    def _micro_batches(self, batch: SequenceBatch, count: int | None) -> list[MicroBatch | None]:
        """This rank's micro-batches; None marks a placeholder forward run only to keep ranks in step.

        Every rank must run the same number of forwards and backwards (ZeRO-3 gathers parameters
        in them, ZeRO-2 reduces gradients in them), so a short shard is padded with placeholders.
        """
        n = len(batch)
        if count is None:
            count = max(1, math.ceil(n / self.cfg.micro_batch_size))
        size = max(1, math.ceil(n / count))
        chunks = [list(range(i * size, min(n, (i + 1) * size))) for i in range(count)]
        return [self._prepare(batch.select(idx)) if idx else None for idx in chunks]

    def _prepare(self, sequences: SequenceBatch) -> MicroBatch:
        return _to_device(MicroBatch.from_sequences(sequences, self.pad_id), self.device)

    def _placeholder(self) -> MicroBatch:
        return self._prepare(SequenceBatch(input_ids=[[self.pad_id, self.pad_id]], prompt_lens=[1]))

    def _logits(self, model, mb: MicroBatch, temperature: float) -> torch.Tensor:
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        return mb.completion_logits(out.logits).float() / temperature

    # ------------------------------------------------------------------ public API

    def train_step(
        self,
        batch: SequenceBatch,
        loss_fn,
        temperature: float = 1.0,
        num_micro_batches: int | None = None,
    ) -> dict[str, float]:
        """Forward/backward every micro-batch, then one optimizer step.

        Returns the loss_fn metrics summed over micro-batches, `loss` (the sum of the scalars
        differentiated, i.e. this rank's share of the step's global loss), `grad_norm` (before
        clipping) and `lr` (the one this step used).
        """
        self.engine.train()
        micro = self._micro_batches(batch, num_micro_batches)
        metrics: dict[str, float] = {}
        for i, mb in enumerate(micro):
            # The boundary (reduction bookkeeping, then step) is the last micro-batch, whatever
            # the count; DeepSpeed's fixed gradient_accumulation_steps cannot express that.
            self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            if mb is None:
                loss = self._logits(self.engine, self._placeholder(), temperature).sum() * 0.0
            else:
                loss, part = loss_fn(self._logits(self.engine, mb, temperature), mb)
                _add_metrics(metrics, {**part, "loss": loss.item()})
            # Data parallelism AVERAGES gradients over ranks; the loss is already a share of the
            # global sum, so scaling by world_size turns that average back into the sum.
            # scale_wrt_gas=False: the micro-batch losses are summed, not averaged.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        lr = self.engine.get_lr()[0]
        self.engine.step()
        return {**metrics, "grad_norm": float(self.engine.get_global_grad_norm()), "lr": lr}

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
        if reference and self.reference is None:
            raise ValueError("compute_logprobs(reference=True) needs the learner built with with_reference=True.")
        model = self.reference if reference else self.engine
        model.eval()
        logprobs: list[list[float]] = []
        entropies: list[list[float]] = []
        for mb in self._micro_batches(batch, num_micro_batches):
            if mb is None:
                self._logits(model, self._placeholder(), temperature)
                continue
            logp = torch.log_softmax(self._logits(model, mb, temperature), dim=-1)
            lens = mb.completion_mask.sum(-1).long().tolist()
            token_logp = logp.gather(-1, mb.completion_ids[..., None]).squeeze(-1)
            logprobs += [row[:n].tolist() for row, n in zip(token_logp.cpu(), lens)]
            if with_entropy:
                ent = -(logp.exp() * logp).sum(-1)
                entropies += [row[:n].tolist() for row, n in zip(ent.cpu(), lens)]
        return logprobs, (entropies if with_entropy else None)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The HF model's full state dict as CPU tensors on rank 0 ({} elsewhere); a collective call.

        Parameters are gathered one at a time so that ZeRO-3 never holds the whole model on the
        accelerator. Tied weights stay one shared tensor under both names, as in model.state_dict().
        """
        import deepspeed

        module = self.engine.module
        gathered: dict[int, torch.Tensor] = {}
        for p in module.parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if self.rank == 0:
                    gathered[id(p)] = p.detach().to("cpu", copy=True)
        if self.rank != 0:
            return {}
        return {
            name: gathered[id(t)] if id(t) in gathered else t.detach().to("cpu", copy=True)
            for name, t in module.state_dict(keep_vars=True).items()
        }

    def save_hf(self, out_dir: str) -> None:
        """Write an HF folder (config, safetensors, tokenizer) on rank 0; a collective call."""
        from transformers import AutoTokenizer

        state = self.full_state_dict()
        if self.rank == 0:
            self.engine.module.save_pretrained(out_dir, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
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
    ):
        import ray

        self.cfg = learner_cfg
        n = learner_cfg.num_learners
        gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        actor = ray.remote(num_cpus=learner_cfg.learner_cpus, num_gpus=gpus)(LearnerWorker)
        port = _free_port()
        self.workers = [
            actor.remote(model_path, learner_cfg, dtype, rank, n, "127.0.0.1", port, seed, total_steps, with_reference)
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
                raise RuntimeError(
                    f"learner rank {rank_of[ref]} of {len(refs)} failed in {what}: {type(cause).__name__}: {cause}"
                ) from e
        return results

    def _shards(self, batch: SequenceBatch) -> tuple[list[SequenceBatch], int]:
        """Contiguous per-rank shards and the micro-batch count every rank runs (set by the largest)."""
        parts = split_evenly(len(batch), len(self.workers))
        count = max(1, math.ceil(max(map(len, parts)) / self.cfg.micro_batch_size))
        return [batch.select(p) for p in parts], count

    def train_step(self, batch: SequenceBatch, loss_fn, temperature: float = 1.0) -> dict[str, float]:
        """One optimizer step on the whole batch: metrics (with `loss`, the step's global loss) summed
        over ranks, grad_norm and lr of rank 0."""
        shards, count = self._shards(batch)
        refs = [w.train_step.remote(s, loss_fn, temperature, count) for w, s in zip(self.workers, shards)]
        results = self._wait(refs, "train_step")
        metrics: dict[str, float] = {}
        for r in results:
            _add_metrics(metrics, {k: v for k, v in r.items() if k not in ("grad_norm", "lr")})
        return {**metrics, "grad_norm": results[0]["grad_norm"], "lr": results[0]["lr"]}

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

    def save_hf(self, out_dir: str) -> None:
        self._wait([w.save_hf.remote(out_dir) for w in self.workers], "save_hf")

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
