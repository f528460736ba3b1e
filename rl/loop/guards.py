"""What stops a run on purpose: divergence guards, interrupts, engines past their restarts.

`DivergenceGuard` watches each update and each step: a non-finite loss or gradient norm means the
learner skipped the update (see `LearnerWorker.train_step`); a policy whose entropy has risen to
about ln(vocabulary), or whose gradient is exactly 0 while its advantages are not, or whose entropy
rises while its completions shrink (the distillation failure, ENTROPY_RISE_FACTOR), has collapsed.
`GracefulStop` turns Ctrl-C / SIGTERM into a stop at the next step boundary. `EngineRecovery`
restarts dead or hung rollout engines and retries what they were doing. Each stop is a
`RunStopped` naming the step and the last checkpoint; the loop then writes no final model.
"""
from __future__ import annotations

import math
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from rl.loop.checkpoint import checkpoint_note
from rl.loop.stopped import RunStopped

# Entropy above this fraction of ln(V) is taken for the uniform distribution (ln(V) itself is the
# maximum); a trained LM sits far below it (about 0.5-3 nats against ln(49152) = 10.8 for SmolLM2).
UNIFORM_ENTROPY_FRACTION = 0.9
# ... and it counts as a collapse only for a policy that started well below it: a randomly
# initialised or barely trained model starts near uniform, and noise there must not stop a run.
HEALTHY_ENTROPY_FRACTION = 0.75
# The failure distillation runs report (OPSD/OPD, issue 27): per-token KL on every token makes the
# policy more uncertain and its reasoning shorter. Taken for a collapse when, against the first
# step, the entropy per token has risen by half (x1.5) while the mean completion length has fallen
# by half (x0.5), on this many checked steps in a row (one noisy step is not a trend). Both
# thresholds are relative, so they hold for any model and task: a healthy run moves either one
# alone (entropy falls as RL sharpens the policy; length moves with the task), not both this far.
ENTROPY_RISE_FACTOR = 1.5
LENGTH_FALL_FACTOR = 0.5
RISE_AND_FALL_STEPS = 2


def has_signal(token_fields: dict) -> bool:
    """Whether any trained token has a non-zero advantage (False for algorithms without advantages)."""
    advantages = token_fields.get("advantages")
    if advantages is None:
        return False
    masks = token_fields.get("loss_mask") or [[1.0] * len(row) for row in advantages]
    return any(a != 0 and m > 0 for row, mask in zip(advantages, masks) for a, m in zip(row, mask))


class DivergenceGuard:
    """Counts skipped updates and spots collapse; `check` stops the run when either goes too far.

    warn(message) shows a warning on the console (above the progress bar)."""

    def __init__(self, max_skipped_in_a_row: int, stop_on_collapse: bool, vocab_size: int, run_dir: Path,
                 warn: Callable[[str], None]):
        self.max_skipped_in_a_row = max_skipped_in_a_row
        self.stop_on_collapse = stop_on_collapse
        self.uniform_entropy = math.log(vocab_size)
        self.run_dir = Path(run_dir)
        self.warn = warn
        self.skipped = 0  # in this process's steps
        self.in_a_row = 0
        self.first_entropy: float | None = None
        self.first_length: float | None = None
        self.rise_and_fall = 0  # checked steps in a row with entropy up and length down (ENTROPY_RISE_FACTOR)

    def resume_from(self, records: list[dict]) -> None:
        """A resumed run goes on measuring against its own first step, not the first after the resume:
        the first values and the rise-and-fall streak from the records kept up to the checkpoint."""
        for key, first in (("entropy", "first_entropy"), ("response_length", "first_length")):
            value = next((r[key] for r in records if math.isfinite(r.get(key, math.nan))), None)
            setattr(self, first, value)
        self.rise_and_fall = 0
        for r in records:
            bad = (r.get("entropy/vs_first", 0.0) >= ENTROPY_RISE_FACTOR
                   and r.get("response_length/vs_first", math.inf) <= LENGTH_FALL_FACTOR)
            self.rise_and_fall = self.rise_and_fall + 1 if bad else 0

    def relative(self, metrics: dict) -> dict:
        """`entropy/vs_first` and `response_length/vs_first`: this step's over the first step's (from
        the first step that reports each), for the step's metrics."""
        out = {}
        for key, first in (("entropy", "first_entropy"), ("response_length", "first_length")):
            value = metrics.get(key)
            if value is None or not math.isfinite(value):
                continue
            if getattr(self, first) is None:
                setattr(self, first, value)
            if getattr(self, first):
                out[f"{key}/vs_first"] = value / getattr(self, first)
        return out

    def record_update(self, step: int, train_metrics: dict) -> None:
        """After each learner update: count it if the learner skipped it."""
        loss, grad_norm = train_metrics.get("loss", 0.0), train_metrics.get("grad_norm", 0.0)
        if train_metrics.get("update_skipped") or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.skipped += 1
            self.in_a_row += 1
            self.warn(
                f"step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); the update was "
                f"skipped (no optimizer step). Skipped so far: {self.skipped}."
            )
        else:
            self.in_a_row = 0

    def check(self, step: int, metrics: dict, advantages_nonzero: bool) -> None:
        """After the step is recorded: raise RunStopped on repeated skips or (if so configured) collapse."""
        if self.in_a_row > self.max_skipped_in_a_row:
            raise RunStopped(
                f"Training diverged: {self.in_a_row} updates in a row up to step {step} had a non-finite loss "
                f"or gradient norm and were skipped (limit train.max_skipped_updates={self.max_skipped_in_a_row}). "
                "Lower learner.lr, check the reward and the data for extreme values, or use float32. No final "
                f"model was written. {checkpoint_note(self.run_dir)}"
            )
        if self.in_a_row:
            return  # a skipped update says nothing about the policy's health
        problem = self._collapse(metrics, advantages_nonzero)
        if problem is None:
            return
        if not self.stop_on_collapse:
            self.warn(f"step {step}: the policy has collapsed: {problem}. Training goes on (train.stop_on_collapse=false).")
            return
        raise RunStopped(
            f"The policy collapsed at step {step}: {problem}. The run stops here and writes no final model "
            "(train.stop_on_collapse=true); lower learner.lr (or raise learner.warmup_steps) and start again. "
            f"{checkpoint_note(self.run_dir)}"
        )

    def _collapse(self, metrics: dict, advantages_nonzero: bool) -> str | None:
        entropy = metrics.get("entropy")
        if entropy is not None and math.isfinite(entropy):
            near_uniform = entropy >= UNIFORM_ENTROPY_FRACTION * self.uniform_entropy
            if self.first_entropy is None:
                # A randomly initialised model starts uniform: only a rise to it is a collapse.
                self.first_entropy = entropy
            elif near_uniform and self.first_entropy < HEALTHY_ENTROPY_FRACTION * self.uniform_entropy:
                return (
                    f"its entropy is {entropy:.2f} nats per token, about ln(vocabulary) = {self.uniform_entropy:.2f}, "
                    f"the uniform distribution (it was {self.first_entropy:.2f} at the start)"
                )
        if metrics.get("grad_norm") == 0.0 and advantages_nonzero:
            return "its gradient norm is exactly 0 although the advantages are not (dead weights)"
        return self._rising_entropy_falling_length(metrics)

    def _rising_entropy_falling_length(self, metrics: dict) -> str | None:
        ratios = self.relative(metrics)
        entropy, length = ratios.get("entropy/vs_first"), ratios.get("response_length/vs_first")
        if entropy is None or length is None:
            return None
        bad = entropy >= ENTROPY_RISE_FACTOR and length <= LENGTH_FALL_FACTOR
        self.rise_and_fall = self.rise_and_fall + 1 if bad else 0
        if self.rise_and_fall < RISE_AND_FALL_STEPS:
            return None
        return (
            f"its entropy per token rose to {entropy:.2f}x the first step's ({self.first_entropy:.2f} nats) while its "
            f"completions shrank to {length:.2f}x their first length ({self.first_length:.1f} tokens), for "
            f"{self.rise_and_fall} steps in a row: the distillation failure in which KL on every token raises entropy "
            f"and cuts the reasoning short (limits: entropy >= {ENTROPY_RISE_FACTOR}x and length <= "
            f"{LENGTH_FALL_FACTOR}x for {RISE_AND_FALL_STEPS} steps); lower learner.lr, clip the divergence "
            "(opsd.clip) or use opsd.mode=rlsd"
        )


class GracefulStop:
    """While active, the first SIGINT or SIGTERM asks the loop to stop at the next step boundary;
    a second SIGINT interrupts at once (KeyboardInterrupt). Only the main thread can own signals:
    elsewhere it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: Callable[[str], None] = print):
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (130, 143)."""
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.announce(
            f"{signal.Signals(signum).name}: stopping after the current step (and saving a checkpoint unless "
            "checkpoint.on_interrupt=false); press Ctrl-C again to stop at once."
        )

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class EngineRecovery:
    """Runs pool work; when an engine has died or stopped answering, restarts it, gives the engines
    the learner's current weights through the run's own transport (`resync()`), and runs the work
    again, at most `max_restarts` times in the run."""

    def __init__(self, pool, resync: Callable[[], object], max_restarts: int, run_dir: Path,
                 warn: Callable[[str], None]):
        self.pool, self.resync, self.max_restarts = pool, resync, max_restarts
        self.run_dir, self.warn = Path(run_dir), warn
        self.restarts = 0

    def run(self, step: int, what: str, work: Callable[[], object]):
        from rollouts.pool import RolloutEngineError

        while True:
            try:
                return work()
            except RolloutEngineError as error:
                # A ping waits no longer than a call may (a hung engine is found in timeout_s).
                broken = self.pool.unresponsive(min(60.0, self.pool.timeout_s or 60.0))
                if not broken:
                    raise  # every engine answers: the failure is the work's own, not a crash
                if self.restarts + len(broken) > self.max_restarts:
                    raise RunStopped(
                        f"Step {step}: rollout engine(s) {broken} died or stopped answering ({error}), and the run "
                        f"already restarted {self.restarts} (limit rollout.max_restarts={self.max_restarts}). "
                        "Check the engine logs in "
                        f"{self.run_dir / 'logs'} (memory, a crashing kernel). No final model was written. "
                        f"{checkpoint_note(self.run_dir)}"
                    ) from None
                for index in broken:
                    self.restarts += 1
                    self.warn(
                        f"step {step}: rollout engine {index} died or stopped answering in {what} ({error}); "
                        f"restarting it (restart {self.restarts} of at most {self.max_restarts})."
                    )
                    self.pool.restart(index)
                self.resync()
