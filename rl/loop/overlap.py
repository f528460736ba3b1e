"""train.max_staleness >= 1: the next step's rollouts are generated on a thread while the learner
trains on this step's. `version` counts the learner's weight updates; the engines hold the version
last pushed, and a batch's age is the learner's version minus the one it was sampled with."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class RolloutsAhead:
    """`generate(step, start) -> (rollouts, next start)` for every step, one step ahead when enabled.
    `saved`: the rollouts in flight as a checkpoint kept them, (result, version sampled with)."""

    def __init__(self, generate: Callable, total_steps: int, enabled: bool, saved: tuple | None = None):
        self.generate, self.total_steps = generate, total_steps
        self.threads = ThreadPoolExecutor(1, thread_name_prefix="rollouts-ahead") if enabled else None
        self.in_flight: tuple[Future, int] | None = None
        if saved is not None:  # resumed: the next step's rollouts as the checkpoint kept them
            future = Future()
            future.set_result(saved[0])
            self.in_flight = (future, saved[1])

    def take(self, step: int, start: int, version: int) -> tuple[object, int, int]:
        """Step `step`'s (rollouts, next start, version sampled with); starts the next step's."""
        if self.in_flight is None:
            (rollouts, next_start), made_with = self.generate(step, start), version
        else:
            (future, made_with), self.in_flight = self.in_flight, None
            rollouts, next_start = future.result()
        if self.threads is not None and step < self.total_steps:
            # Sampled with the weights the engines hold now, while the learner trains on this
            # step's: one version behind when they are trained on.
            self.in_flight = (self.threads.submit(self.generate, step + 1, next_start), version)
        return rollouts, next_start, made_with

    def wait(self) -> None:
        """Until the engines are idle: their weights are about to change."""
        if self.in_flight is not None:
            self.in_flight[0].result()

    def saved(self) -> tuple | None:
        """What a checkpoint keeps of the rollouts in flight: (their result, version sampled with).
        At a step's end they are finished: the engines were waited for before the weight push."""
        return None if self.in_flight is None else (self.in_flight[0].result(), self.in_flight[1])

    def close(self) -> None:
        if self.threads is not None:
            self.threads.shutdown(wait=False, cancel_futures=True)
