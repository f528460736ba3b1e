"""The step: forward/backward over a rank's micro-batches and one optimizer step, and the no-grad
scoring forward (`compute_logprobs`). The loss is whatever the caller hands in (its contract: rl.learner)."""
from __future__ import annotations

from functools import partial

import torch

from rl.core.batch import MicroBatch, PolicyOutputs, SequenceBatch
from rl.learner.frozen import FrozenModels
from rl.learner.micro_batches import MicroBatcher


def add_metrics(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + float(v)


def _call_loss(loss_fn, mb, temperature, teacher_out, teacher_weight, hidden, weight, estimator_passes=None):
    # teacher_out: the teacher's hidden states (or one-step logits), or its estimator passes
    teacher_passes = teacher_out if isinstance(teacher_out, tuple) else None
    teacher_hidden = teacher_passes[0][0] if teacher_passes else teacher_out
    out = PolicyOutputs(hidden, weight, temperature, teacher_hidden, teacher_weight, estimator_passes=estimator_passes,
                        teacher_estimator_passes=teacher_passes)
    loss, metrics = loss_fn(out, mb)
    return loss, metrics, out.kept_logprobs


def _placeholder_loss(out: PolicyOutputs, mb: MicroBatch):
    # Touches every parameter, so that every rank's backward reduces the same gradients.
    return out.logits().sum() * 0.0, {}


def _rows(values: torch.Tensor, mb: MicroBatch) -> list[list[float]]:
    """[B, T] completion-aligned values -> one list per sequence, its completion's length long."""
    lens = mb.completion_mask.sum(-1).long().tolist()
    return [row[:n].tolist() for row, n in zip(values.cpu(), lens)]


def _token_scores(mb: MicroBatch, temperature: float, with_entropy: bool, hidden, weight, estimator_passes=None):
    # Chunked over positions: never a [B, T, V] tensor, however long the completions.
    out = PolicyOutputs(hidden, weight, temperature, estimator_passes=estimator_passes)
    token_logp, entropy = out.token_logprobs_and_entropy(mb.completion_ids, mb.completion_mask)
    return token_logp, (entropy if with_entropy else None)


class StepRunner:
    """One rank's passes over its shard: `engine` (DeepSpeed's, around the policy) trains, `frozen`
    scores as the reference or a teacher, `batcher` cuts the shard into micro-batches."""

    def __init__(self, engine, batcher: MicroBatcher, frozen: FrozenModels, teacher_kind: str, world_size: int):
        self.engine, self.batcher, self.frozen = engine, batcher, frozen
        self.teacher_kind, self.world_size = teacher_kind, world_size

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
        micro = self.batcher.micro_batches(batch, num_micro_batches)
        with_teacher = batch.teacher_input_ids is not None
        teacher_weight = self.frozen.teacher_head_weight() if with_teacher else None
        metrics: dict[str, float] = {}
        logprobs: list[list[float]] = []
        for i, pair in enumerate(micro):
            # The boundary (reduction bookkeeping, then step) is the last micro-batch, whatever
            # the count; DeepSpeed's fixed gradient_accumulation_steps cannot express that.
            self.engine.set_gradient_accumulation_boundary(i == len(micro) - 1)
            mb, teacher_mb = pair or self.batcher.placeholder(with_teacher)
            teacher_hidden = None if teacher_mb is None else self.frozen.score(self.teacher_kind, teacher_mb)
            loss_or_placeholder = loss_fn if pair else _placeholder_loss
            fn = partial(_call_loss, loss_or_placeholder, mb, temperature, teacher_hidden, teacher_weight)
            loss, part, kept = self.engine(mb=mb, fn=fn)
            if pair:
                add_metrics(metrics, {**part, "loss": loss.item()})
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
        if self.frozen.ema is not None:
            self.frozen.update_ema()
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
        for pair in self.batcher.micro_batches(batch, num_micro_batches):
            mb = pair[0] if pair else self.batcher.placeholder(False)[0]
            token_logp, ent = self.frozen.score(which, mb, partial(_token_scores, mb, temperature, with_entropy))
            if not pair:
                continue
            logprobs += _rows(token_logp, mb)
            if with_entropy:
                entropies += _rows(ent, mb)
        return logprobs, (entropies if with_entropy else None)

