"""`LearnerGroup`: `learner.num_learners` LearnerWorker ranks (rl.learner.worker) as Ray actors,
each given a contiguous shard of every batch; the driver-facing learner."""
from __future__ import annotations

import socket

import torch

from rl.core.actors import even_bounds, gather
from rl.config import LearnerConfig, LoraConfig
from rl.core.batch import SequenceBatch, plan_micro_batches
from rl.learner.model import DiffusionForward
from rl.learner.step import add_metrics
from rl.learner.worker import LearnerWorker


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
        plugins: list[str] | None = None,
        wait: bool = True,
    ):
        """Arguments as LearnerWorker's (`plugins`: the config's, imported by every rank first;
        `wait=False`: return once the ranks are asked for, `wait_started` waits for them). `placement` (rl.loop.placement's applied ResourcePlan): rank r runs
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
                with_reference, teacher, lora, diffusion, list(plugins or []),
            )
            for rank in range(n)
        ]
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        # Actors are constructed concurrently; DeepSpeed's init returns once all ranks joined.
        self._wait([w.__ray_ready__.remote() for w in self.workers], "init")

    def _wait(self, refs: list, what: str) -> list:
        """Results in rank order; the first failing rank raises at once, since the others may
        be blocked in a collective waiting for it."""
        return gather(refs, what, lambda rank: f"learner rank {rank} of {len(refs)}", LearnerRankError)

    def _shards(self, batch: SequenceBatch) -> tuple[list[SequenceBatch], int]:
        """Contiguous per-rank shards and the micro-batch count every rank runs (set by the largest)."""
        c = self.cfg
        shards = [batch.select(list(range(lo, hi))) for lo, hi in even_bounds(len(batch), len(self.workers))]
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
            add_metrics(metrics, {k: v for k, v in r.items() if k not in RANK_AGREED})
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

    def submit_weight_work(self, fn, *args) -> list:
        """Start fn(WeightSource, *args) in every rank's actor without waiting (a weight transport's
        learner side, rl.sync.weight_sync); `wait` collects the results in rank order."""
        return [w.weight_work.remote(fn, *args) for w in self.workers]

    def wait(self, refs: list, what: str) -> list:
        return self._wait(refs, what)

    def save_hf(self, out_dir: str, adapter: bool = False) -> None:
        self._wait([w.save_hf.remote(out_dir, adapter) for w in self.workers], "save_hf")

    def checkpoint_bytes(self, timeout_s: float | None = None) -> int:
        """The estimated size of the learner's part of a checkpoint (rank 0's count: every rank
        sees every parameter's full size); `timeout_s` bounds the wait on a stuck rank."""
        refs = [w.checkpoint_bytes.remote() for w in self.workers]
        return gather(refs, "checkpoint size", lambda r: f"learner rank {r}", LearnerRankError, timeout_s)[0]

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
