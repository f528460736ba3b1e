"""A pool of killable reward worker processes with a hard deadline per task.

Workers come from a forkserver: a clean single-threaded process that has already imported
math-verify, so a replacement starts in milliseconds instead of the ~2 s of a spawn, and no
worker is forked from the trainer itself (its Ray and torch threads would be copied in a broken
state). Each worker has its own pipe: tasks go out in chunks, one result comes back per task, in
order. The parent times the task at the head of each worker's chunk; past `timeout_s` it kills
the worker, records a timeout for that task, puts the rest of the chunk back in the queue and
starts a replacement. Every result carries its task id, so a kill never loses or shifts a score.
"""
from __future__ import annotations

import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait

from rewards.calls import call_reward

# Spawning a worker and importing user reward code (maybe torch-heavy) on a loaded 2-core
# machine can take tens of seconds; a worker silent for longer than this is broken.
START_TIMEOUT_S = 120.0
# Tasks per message: large enough that pipe round trips stay a small share of ~1 ms reward
# calls, small enough that the work spreads over the workers and a kill re-queues little.
MAX_CHUNK = 32


class WorkerStartError(RuntimeError):
    """A worker could not load the rewards or did not start in time."""


@dataclass(frozen=True)
class Task:
    reward_index: int
    completion: str
    kwargs: dict


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok", "error" or "timeout"
    value: float | dict | str  # the checked result when ok, else a message


def _worker_main(conn, refs: list[str]) -> None:
    import signal

    from rewards.math import disable_signal_timeouts
    from rewards.registry import get_reward

    # A terminal's Ctrl-C reaches the whole process group: the trainer decides when workers stop
    # (it closes their pipes or kills them), so the signal must not end one mid-task with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        disable_signal_timeouts()
        import math_verify  # noqa: F401  (its ~1 s import must not count against a task's deadline)

        fns = [get_reward(ref) for ref in refs]
        message = ("ready", None, None)
    except Exception as e:
        message = ("init_error", f"{type(e).__name__}: {e}", None)
    try:
        conn.send(message)
    except OSError:  # the pool closed before this worker started
        return
    if message[0] != "ready":
        return
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe: shut down
            return
        for task_id, reward_index, completion, kwargs in chunk:
            status, value = call_reward(fns[reward_index], completion, kwargs)
            conn.send((task_id, status, value))


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: object
    spawned_at: float
    ready: bool = False
    inflight: deque = field(default_factory=deque)
    head_started: float = 0.0


class RewardPool:
    """`workers` processes that call the rewards named by `refs` (portable references).

    Workers start at the first `run`, so building a pool (and validating a config) is cheap and
    leaves nothing to clean up if the run fails before scoring.
    """

    def __init__(self, refs: list[str], workers: int, timeout_s: float):
        if workers < 1:
            raise ValueError("a RewardPool needs at least one worker; score inline instead")
        self.refs, self.size, self.timeout_s = list(refs), workers, timeout_s
        self._ctx = mp.get_context("forkserver")
        # Takes effect when this process's forkserver starts; if something started it earlier,
        # workers import these themselves (slower to start, same behaviour).
        self._ctx.set_forkserver_preload(["rewards.pool", "rewards.math", "math_verify"])
        self._workers: list[_Worker] = []
        self.restarts = 0  # workers started in place of killed or dead ones

    def _fill(self) -> None:
        while len(self._workers) < self.size:
            parent, child = self._ctx.Pipe()
            process = self._ctx.Process(target=_worker_main, args=(child, self.refs), daemon=True, name="reward-worker")
            process.start()
            child.close()
            self._workers.append(_Worker(process, parent, time.monotonic()))

    def _retire(self, w: _Worker) -> None:
        w.process.kill()
        w.process.join()
        w.conn.close()
        self._workers.remove(w)

    def run(self, tasks: list[Task]) -> list[Outcome]:
        """One outcome per task, in order; reward failures are outcomes, never exceptions."""
        try:
            return self._run(tasks)
        except BaseException:
            # Results still in flight belong to this batch: drop their workers so that no later
            # batch can receive them.
            for w in [w for w in self._workers if w.inflight]:
                self._retire(w)
            raise

    def _run(self, tasks: list[Task]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        chunk = max(1, min(MAX_CHUNK, -(-len(tasks) // (2 * self.size))))
        remaining = len(tasks)
        while remaining:
            self._fill()
            now = time.monotonic()
            for w in self._workers:
                if w.ready and not w.inflight and pending:
                    ids = [pending.popleft() for _ in range(min(chunk, len(pending)))]
                    w.conn.send([(i, tasks[i].reward_index, tasks[i].completion, tasks[i].kwargs) for i in ids])
                    w.inflight.extend(ids)
                    w.head_started = now
            wait([w.conn for w in self._workers], timeout=self._next_deadline() - time.monotonic())
            for w in list(self._workers):
                remaining -= self._collect(w, outcomes, pending)
            for w in list(self._workers):
                remaining -= self._enforce_deadline(w, outcomes, pending)
        return outcomes

    def _next_deadline(self) -> float:
        deadlines = [w.head_started + self.timeout_s for w in self._workers if w.inflight]
        deadlines += [w.spawned_at + START_TIMEOUT_S for w in self._workers if not w.ready]
        return min(deadlines, default=time.monotonic() + 1.0)

    def _collect(self, w: _Worker, outcomes: list, pending: deque) -> int:
        """Read what `w` has sent; a dead worker's head task fails, the rest go back in the queue."""
        done = 0
        try:
            while w.conn.poll():
                task_id, status, value = w.conn.recv()
                if task_id == "init_error":
                    self._retire(w)
                    raise WorkerStartError(f"A reward worker could not load the rewards {self.refs}: {status}")
                if task_id == "ready":
                    w.ready = True
                    continue
                outcomes[task_id] = Outcome(status, value)
                w.inflight.popleft()
                w.head_started = time.monotonic()
                done += 1
        except (EOFError, OSError):
            if not w.ready:
                self._retire(w)
                raise WorkerStartError(
                    f"A reward worker exited while loading the rewards {self.refs} (exit code {w.process.exitcode})."
                ) from None
            if w.inflight:
                done += self._fail_head(w, outcomes, pending, "error", self._death_message(w))
            else:
                self._retire(w)
        return done

    def _death_message(self, w: _Worker) -> str:
        w.process.join(timeout=1.0)
        return (
            f"the reward worker process died (exit code {w.process.exitcode}) while running this reward: "
            "a crash, os._exit or a signal inside the reward function"
        )

    def _enforce_deadline(self, w: _Worker, outcomes: list, pending: deque) -> int:
        now = time.monotonic()
        if not w.ready and now > w.spawned_at + START_TIMEOUT_S:
            self._retire(w)
            raise WorkerStartError(f"A reward worker did not load the rewards {self.refs} within {START_TIMEOUT_S:.0f} s.")
        if w.inflight and now > w.head_started + self.timeout_s:
            message = f"no result within reward.timeout_s={self.timeout_s:g} s; the worker was killed and replaced"
            return self._fail_head(w, outcomes, pending, "timeout", message)
        return 0

    def _fail_head(self, w: _Worker, outcomes: list, pending: deque, status: str, message: str) -> int:
        head = w.inflight.popleft()
        outcomes[head] = Outcome(status, message)
        pending.extendleft(reversed(w.inflight))
        w.inflight.clear()
        self._retire(w)
        self.restarts += 1
        return 1

    def close(self) -> None:
        for w in list(self._workers):
            w.conn.close()  # an idle worker exits on EOF; a busy or starting one is killed
        for w in list(self._workers):
            w.process.join(timeout=0.5 if w.ready and not w.inflight else 0.0)
            self._retire(w)
