"""A pool of rollout engines, one per Ray actor, driven from the trainer process."""
from __future__ import annotations

from collections.abc import Callable

from rl.core.actors import even_bounds, gather
from rl.core.types import Completion, EngineSettings, SamplingSpec, ScoringRequest, TopK


class RolloutEngineError(RuntimeError):
    """An engine in a RolloutPool failed, died or did not answer in time."""


class _EngineHost:
    """The actor body: owns one engine and runs its methods."""

    def __init__(self, kind: str, model_path: str, seed: int, settings: EngineSettings, plugins: list[str]):
        from rl.core.plugins import import_plugins
        from rollouts.registry import make_engine

        # Kept and raised from ready(): an exception escaping __init__ reaches the driver only as
        # the actor's death notice, its cause flattened into a traceback string.
        self.start_error = None
        try:
            import_plugins(plugins)  # first: a plug-in may register the engine, or what its calls carry
            self.engine = make_engine(kind, model_path, seed=seed, settings=settings)
        except Exception as e:
            self.start_error = e

    def ready(self) -> bool:
        if self.start_error is not None:
            raise self.start_error
        return True

    def call(self, method: str, *args):
        return getattr(self.engine, method)(*args)

    def in_weight_workers(self, fn: Callable, *args):
        return self.engine.in_weight_workers(fn, *args)

    def apply(self, fn: Callable):
        return fn(self.engine)


class RolloutPool:
    """`num_engines` engines in Ray actors; engine i is seeded `seed + i`.

    Requests are split into contiguous chunks, one per engine, and answers come back in input
    order. Any failure inside an actor is raised here as RolloutEngineError naming the engine;
    with `timeout_s` set, an engine that does not answer in time is reported the same way rather
    than stalling the trainer. The caller owns `ray.init`. With a `placement` (rl.loop.placement's
    applied ResourcePlan) engine i runs in the plan's engine slot i (its GPUs, node and threads);
    without one each actor just reserves `engine_cpus`.
    """

    def __init__(
        self,
        kind: str,
        model_path: str,
        num_engines: int = 1,
        seed: int = 0,
        engine_cpus: float = 1.0,
        timeout_s: float | None = None,
        placement=None,
        settings: EngineSettings | None = None,
        plugins: list[str] | None = None,
        wait: bool = True,
        slots: list | None = None,
        **setting_fields,
    ):
        """`settings` (or its fields as keywords): what every engine is built with; `plugins`: the
        config's, imported by every engine actor before its engine is built. `wait=False` returns
        once the actors are asked for; `wait_started` then waits for them. `slots`: the placement's
        slots the engines take (default: its rollout engines'; another model's scoring engines take
        some of `placement.scorers`)."""
        from rollouts.registry import engine_class

        self.kind = kind
        self.engine_class = engine_class(kind)
        self.timeout_s = timeout_s
        self.placement = placement
        self._slots = slots if slots is not None or placement is None else placement.engines
        self._model_path, self._seed, self._engine_cpus = model_path, seed, engine_cpus
        self._settings, self._plugins = settings or EngineSettings(**setting_fields), list(plugins or [])
        self._actors = [self._spawn(i) for i in range(num_engines)]
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        """Until every engine is built. Construction errors (bad path, no memory) surface here, not
        at the first generate."""
        try:
            self._gather("start", [a.ready.remote() for a in self._actors])
        except RolloutEngineError:
            self._kill()
            raise

    def _spawn(self, index: int):
        """Start engine `index`'s actor (not waiting for it): the one place an engine is placed,
        used at start and to replace an engine."""
        import ray

        if self.placement is None:
            options = dict(num_cpus=self._engine_cpus)
        else:
            options = self.placement.actor_options(self._slots[index])
        actor = ray.remote(**options)(_EngineHost)
        return actor.remote(self.kind, self._model_path, self._seed + index, self._settings, self._plugins)

    @property
    def num_engines(self) -> int:
        return len(self._actors)

    def unresponsive(self, timeout_s: float = 60.0) -> list[int]:
        """Indices of the engines that are dead or do not answer a ping within timeout_s."""
        import ray

        pings = [a.ready.remote() for a in self._actors]
        done, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        broken = []
        for index, ping in enumerate(pings):
            if ping not in done:
                broken.append(index)
                continue
            try:
                ray.get(ping)
            except ray.exceptions.RayError:
                broken.append(index)
        return broken

    def restart(self, index: int) -> None:
        """Replace engine `index` (dead or hung) by a fresh one with its seed, and wait until it is up.
        It starts from the model's initial weights: the caller pushes the current ones."""
        import ray

        ray.kill(self._actors[index], no_restart=True)
        self._actors[index] = self._spawn(index)
        self._gather("restart", [self._actors[index].ready.remote()])

    def generate(
        self, prompts: list[list[int]], spec: SamplingSpec, hints: list[dict[int, int]] | None = None
    ) -> list[list[Completion]]:
        return self._spread("generate", prompts, spec, aligned=hints)

    def set_step_seed(self, seed: int) -> None:
        """Engine i samples next with seed + i, so that engines draw different samples."""
        self._gather("set_step_seed", [a.call.remote("set_step_seed", seed + i) for i, a in enumerate(self._actors)])

    def score(self, requests: list[ScoringRequest]) -> list[list[float]]:
        return self._spread("score", requests)

    def score_top_k(self, requests: list[ScoringRequest], k: int) -> list[TopK]:
        return self._spread("score_top_k", requests, k)

    def score_each_engine(self, requests: list[ScoringRequest]) -> list[list[list[float]]]:
        """Every engine scores every request: the per-engine check after a weight push."""
        return self._gather("score", [a.call.remote("score", requests) for a in self._actors])

    def load_weights(self, state_dict: dict) -> None:
        """Every engine loads `state_dict` (one copy in the object store, read by every actor)."""
        import ray

        ref = ray.put(state_dict)
        self._gather("load_weights", [a.call.remote("load_weights", ref) for a in self._actors])

    def weight_workers(self) -> list[int]:
        """How many processes hold each engine's weights, in engine order."""
        return self._gather("weight_workers", [a.call.remote("weight_workers") for a in self._actors])

    def submit_weight_work(self, fn: Callable, per_engine_args: list[tuple] | None = None) -> list:
        """Start fn(WeightWorker, *per_engine_args[i]) in every weight worker of every engine, not
        waiting (rollouts.engine.RolloutEngine.in_weight_workers): how a weight transport reaches
        the engines, for calls that must run while the learner takes part. `wait` collects them."""
        args = per_engine_args or [()] * len(self._actors)
        return [a.in_weight_workers.remote(fn, *arg) for a, arg in zip(self._actors, args)]

    def wait(self, what: str, refs: list) -> list:
        """The results of `submit_weight_work`'s calls, in engine order; the first failure raises
        RolloutEngineError."""
        return self._gather(what, refs)

    def sleep(self) -> None:
        """Free the engines' GPU memory while colocated learners train (a no-op where not enabled)."""
        self._gather("sleep", [a.call.remote("sleep") for a in self._actors])

    def wake_up(self) -> None:
        self._gather("wake_up", [a.call.remote("wake_up") for a in self._actors])

    def apply(self, fn: Callable) -> list:
        """fn(engine) in every actor, results in engine order: diagnostics, benchmarks, and tests
        that patch an engine inside its own process."""
        return self._gather("apply", [a.apply.remote(fn) for a in self._actors])

    def close(self) -> None:
        try:
            self._gather("close", [a.call.remote("close") for a in self._actors])
        finally:
            self._kill()

    def _spread(self, method: str, items: list, *args, aligned: list | None = None) -> list:
        """Contiguous chunks of `items` to the engines, as method(chunk, *args[, aligned chunk]):
        `aligned` (one entry per item, such as hints per prompt) is cut the same way."""
        bounds = even_bounds(len(items), len(self._actors))

        def arguments(lo: int, hi: int) -> tuple:
            return (items[lo:hi], *args) if aligned is None else (items[lo:hi], *args, aligned[lo:hi])

        # Empty chunks are all at the end, so a ref's position is still its engine's index.
        refs = [a.call.remote(method, *arguments(lo, hi)) for a, (lo, hi) in zip(self._actors, bounds) if hi > lo]
        return [x for part in self._gather(method, refs) for x in part]

    def _gather(self, method: str, refs: list) -> list:
        return gather(refs, method, lambda i: f"{self.kind} engine {i}", RolloutEngineError, self.timeout_s)

    def _kill(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []
