"""Where every rollout engine and learner rank runs: one resource plan, applied with a Ray placement group.

The plan is built from the config alone (`rollout.num_engines` x `rollout.gpus_per_engine`,
`learner.num_learners` with one GPU each, `ray.placement`), checked against the cluster before
any actor starts, reserved as one placement group, and then probed: a throw-away actor in every
bundle reports the node, its GPU indices and its cores, so that the launch can print exactly where
each engine and learner rank will run and every actor can be told its threads and address.

- split: every engine and every learner rank has a bundle of its own, so engines and learners
  sit on disjoint GPUs (or CPU reservations). Ray's GPU accounting keeps engines apart.
- colocate: engine i shares one bundle of g GPUs (g = gpus_per_engine) with learner ranks
  [i*g, (i+1)*g). The bundle's reservation keeps every other actor off those GPUs; inside it the
  plan pins them itself (CUDA_VISIBLE_DEVICES from the probe): the engine sees all g, learner
  rank i*g+j sees the j-th. On GPU vLLM sleeps while the learners train.
  Ranks beyond num_engines*g get bundles of their own.
- Scoring engines (a teacher on engines of its own, opsd.teacher.runs_on=engines) always get
  bundles of their own, after the others, in either mode: such a teacher is there because it is
  too large to share.
- On a cluster with no GPU the same code places CPU bundles (engine_cpus / learner_cpus each).

Threads follow the placement: generation and training take turns, so an actor uses all the cores
of its node, shared only with the actors of its own role on that node (which work at the same
time). Ray would otherwise set OMP_NUM_THREADS to the actor's CPU reservation (1 by default),
which cost the engine 40% of its speed on a 2-core machine.
"""
from __future__ import annotations

import math
import os
import socket
from collections import Counter
from dataclasses import dataclass, field

SPLIT, COLOCATE = "split", "colocate"
# A cluster started on this machine may reserve more CPUs than it has cores (engines and learners
# take turns, and an actor's threads follow the cores anyway), but not without bound: 64 engines on
# 2 cores would start 64 processes that never get through their start-up.
LOCAL_CPUS_PER_CORE = 2
LOCAL_MIN_CPUS = 4  # one engine and two learner ranks (with CPU to spare) on the smallest machine


class PlacementError(RuntimeError):
    """The plan does not fit the cluster, or its placement group could not be reserved."""


@dataclass(frozen=True)
class Slot:
    """Where one actor goes: its bundle and what it asks Ray for inside it."""

    role: str  # "engine", "learner" or "scorer"
    rank: int
    bundle: int
    num_gpus: float
    num_cpus: float


@dataclass
class BundleInfo:
    """What the probe found in one reserved bundle."""

    node_id: str
    node_ip: str
    gpu_ids: list[int]
    cores: int
    free_port: int


@dataclass
class ResourcePlan:
    mode: str
    on_gpu: bool
    bundles: list[dict[str, float]]
    engines: list[Slot]
    learners: list[Slot]
    strategy: str = "PACK"
    # Engines and learners work at the same time (train.max_staleness >= 1): they share the cores.
    overlap: bool = False
    # Engines of another model (a teacher on engines of its own), each in a bundle of its own.
    scorers: list[Slot] = field(default_factory=list)
    # Filled by apply():
    placement_group: object = None
    info: list[BundleInfo] = field(default_factory=list)

    # ------------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        *,
        num_engines: int,
        gpus_per_engine: int,
        engine_cpus: float,
        num_learners: int,
        learner_cpus: float,
        mode: str,
        on_gpu: bool,
        strategy: str = "PACK",
        overlap: bool = False,
        scorer_gpus: tuple[int, ...] = (),
    ) -> "ResourcePlan":
        """`scorer_gpus`: one entry per scoring engine (another model's: a teacher on engines), its GPUs."""
        if mode not in (SPLIT, COLOCATE):
            raise ValueError(f"placement must be '{SPLIT}' or '{COLOCATE}', got {mode!r}")
        g = gpus_per_engine if on_gpu else 0
        bundles: list[dict[str, float]] = []
        engines: list[Slot] = []
        learners: list[Slot] = []

        def bundle(cpus: float, gpus: int) -> int:
            bundles.append({"CPU": cpus, **({"GPU": float(gpus)} if gpus else {})})
            return len(bundles) - 1

        if mode == SPLIT:
            for i in range(num_engines):
                engines.append(Slot("engine", i, bundle(engine_cpus, g), float(g), engine_cpus))
            first_alone = 0
        else:
            per_group = max(gpus_per_engine, 1)
            if num_engines * per_group > num_learners:
                raise PlacementError(
                    f"placement=colocate puts learner ranks on every engine GPU, one rank per GPU: "
                    f"{num_engines} engines x {gpus_per_engine} GPUs need learner.num_learners >= "
                    f"{num_engines * per_group}, got {num_learners}. Raise learner.num_learners, lower "
                    "rollout.num_engines, or use ray.placement=split."
                )
            for i in range(num_engines):
                b = bundle(engine_cpus + per_group * learner_cpus, g)
                engines.append(Slot("engine", i, b, 0.0, engine_cpus))
                for r in range(i * per_group, (i + 1) * per_group):
                    learners.append(Slot("learner", r, b, 0.0, learner_cpus))
            first_alone = num_engines * per_group
        for r in range(first_alone, num_learners):
            learners.append(Slot("learner", r, bundle(learner_cpus, 1 if on_gpu else 0), 1.0 if on_gpu else 0.0, learner_cpus))
        scorers = [Slot("scorer", i, bundle(engine_cpus, g if on_gpu else 0), float(g if on_gpu else 0), engine_cpus)
                   for i, g in enumerate(scorer_gpus)]
        return cls(mode, on_gpu, bundles, engines, learners, strategy=strategy, overlap=overlap, scorers=scorers)

    @classmethod
    def from_config(cls, cfg, on_gpu: bool, scoring=()) -> "ResourcePlan":
        """`scoring`: the algorithm's Requirements.scoring_engines."""
        return cls.build(
            num_engines=cfg.rollout.num_engines,
            gpus_per_engine=cfg.rollout.gpus_per_engine,
            engine_cpus=cfg.rollout.engine_cpus,
            num_learners=cfg.learner.num_learners,
            learner_cpus=cfg.learner.learner_cpus,
            mode=cfg.ray.placement,
            on_gpu=on_gpu,
            strategy=cfg.ray.strategy,
            overlap=cfg.train.max_staleness > 0,
            scorer_gpus=tuple(s.gpus_per_engine for s in scoring for _ in range(s.num_engines)),
        )

    # ------------------------------------------------------------------ checking and applying

    def needs(self) -> dict[str, float]:
        total: Counter = Counter()
        for b in self.bundles:
            total.update(b)
        return dict(total)

    def check_fits(self, nodes: list[dict[str, float]]) -> None:
        """Refuse, before anything starts, a plan that no assignment of bundles to these nodes'
        resources (first fit, largest bundles first) can hold, naming what it needs and what is there."""
        free = [dict(n) for n in nodes]
        order = sorted(range(len(self.bundles)), key=lambda i: (-self.bundles[i].get("GPU", 0), -self.bundles[i]["CPU"]))
        for i in order:
            want = self.bundles[i]
            home = next((n for n in free if all(n.get(k, 0.0) >= v - 1e-9 for k, v in want.items())), None)
            if home is None:
                have = "; ".join(
                    f"node {j}: {n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for j, n in enumerate(nodes)
                ) or "no node"
                need = self.needs()
                raise PlacementError(
                    f"The resource plan does not fit the Ray cluster. It needs {need.get('GPU', 0):g} GPU and "
                    f"{need.get('CPU', 0):g} CPU in {len(self.bundles)} bundles ({self.describe_bundles()}); "
                    f"bundle {i} ({_fmt(want)}) fits no node. The cluster has: {have}. Lower "
                    "rollout.num_engines, rollout.gpus_per_engine, learner.num_learners or the *_cpus "
                    "reservations, use ray.placement=colocate to share GPUs, or add nodes."
                )
            for k, v in want.items():
                home[k] -= v

    def local_cpus(self, cores: int) -> int:
        """The CPU count of a Ray cluster started on a machine with `cores` cores for this plan: its
        reservations, at least the cores, and refused beyond LOCAL_CPUS_PER_CORE per core (at
        least LOCAL_MIN_CPUS), before anything starts."""
        need = self.needs()["CPU"]
        allowed = max(LOCAL_MIN_CPUS, LOCAL_CPUS_PER_CORE * cores)
        if need > allowed + 1e-9:
            parts = [f"{len(s)} {role} x {s[0].num_cpus:g} CPU" for role, s in
                     (("engines", self.engines), ("learner ranks", self.learners), ("teacher engines", self.scorers)) if s]
            raise PlacementError(
                f"The resource plan does not fit this machine. It needs {need:g} CPU ({' + '.join(parts)}: "
                "rollout.num_engines x rollout.engine_cpus + learner.num_learners x learner.learner_cpus), and a Ray "
                f"cluster started here has at most {allowed} CPU: this machine has {cores} cores, and actors may "
                f"share them {LOCAL_CPUS_PER_CORE} to 1 (at least {LOCAL_MIN_CPUS} CPU in all), no more. Lower "
                "rollout.num_engines, learner.num_learners or the *_cpus reservations, or join a larger cluster "
                "with ray.address."
            )
        return max(cores, math.ceil(need - 1e-9))

    def describe_bundles(self) -> str:
        return ", ".join(_fmt(b) for b in self.bundles)

    def apply(self, timeout_s: float = 120.0) -> "ResourcePlan":
        """Check against the cluster, reserve the placement group, probe every bundle."""
        import ray
        from ray.util.placement_group import placement_group

        nodes = [
            {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")}
            for n in ray.nodes() if n.get("Alive")
        ]
        self.check_fits(nodes)
        pg = placement_group(self.bundles, strategy=self.strategy)
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            ray.util.remove_placement_group(pg)
            raise PlacementError(
                f"Ray could not reserve the placement group ({self.describe_bundles()}, strategy "
                f"{self.strategy}) within {timeout_s:.0f} s: other jobs hold part of the cluster's resources."
            )
        self.placement_group = pg
        probes = [
            ray.remote(_probe).options(
                num_cpus=0, num_gpus=b.get("GPU", 0), scheduling_strategy=self.strategy_for(i)
            ).remote()
            for i, b in enumerate(self.bundles)
        ]
        self.info = [BundleInfo(**r) for r in ray.get(probes)]
        return self

    def release(self) -> None:
        import ray

        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None

    # ------------------------------------------------------------------ what actors are told

    def strategy_for(self, bundle: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(
            self.placement_group, placement_group_bundle_index=bundle, placement_group_capture_child_tasks=True
        )

    def threads(self, slot: Slot) -> int:
        """The cores of the slot's node, shared with the actors on that node that work at the same
        time: those of its own role when roles take turns, every engine and learner with overlap
        (more threads than cores would make both roles spin against each other)."""
        node = self.info[slot.bundle].node_id
        by_role = {"engine": self.engines, "learner": self.learners, "scorer": self.scorers}
        peers = self.engines + self.learners if self.overlap and slot.role != "scorer" else by_role[slot.role]
        same = [s for s in peers if self.info[s.bundle].node_id == node]
        return max(1, self.info[slot.bundle].cores // len(same))

    def gpu_ids(self, slot: Slot) -> list[int]:
        """GPU indices (on its node) the slot's actor uses: its bundle's; a colocated learner rank
        the one of them its place in the bundle names."""
        if not self.on_gpu:
            return []
        ids = list(self.info[slot.bundle].gpu_ids)
        if slot.role == "learner" and self.mode == COLOCATE and slot.num_gpus == 0:
            sharing = [s.rank for s in self.learners if s.bundle == slot.bundle]
            return [ids[sharing.index(slot.rank)]]
        return ids

    def actor_options(self, slot: Slot) -> dict:
        """ray.remote options putting an actor on its slot, with its threads (and, for an engine
        sharing its bundle's GPUs with learners, those GPUs made visible)."""
        threads = str(self.threads(slot))
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if self.on_gpu and slot.num_gpus == 0:
            # A colocated actor asks Ray for no GPU (the bundle holds them); Ray would then leave
            # CUDA_VISIBLE_DEVICES unset and show it every GPU of the node: name its own.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpu_ids(slot)))
        return dict(
            num_cpus=slot.num_cpus,
            num_gpus=slot.num_gpus,
            scheduling_strategy=self.strategy_for(slot.bundle),
            runtime_env={"env_vars": env},
        )

    def master_address(self) -> tuple[str, int]:
        """(node IP, free port) of learner rank 0's node, where the ranks meet."""
        info = self.info[self.learners[0].bundle]
        return info.node_ip, info.free_port

    def engines_on_learner0_node(self) -> bool:
        """Whether every engine runs on learner rank 0's node, so that they can share its host memory."""
        node = self.info[self.learners[0].bundle].node_id
        return all(self.info[s.bundle].node_id == node for s in self.engines)

    def table(self) -> str:
        """One line per engine and learner rank: node, GPU indices, threads."""
        kind = "GPU" if self.on_gpu else "CPU"
        head = f"resource plan: placement={self.mode}, {kind} bundles [{self.describe_bundles()}]"
        lines = [head]
        for s in [*sorted(self.engines, key=lambda s: s.rank), *sorted(self.learners, key=lambda s: s.rank), *self.scorers]:
            info = self.info[s.bundle]
            gpus = ",".join(map(str, self.gpu_ids(s))) if self.on_gpu else "-"
            lines.append(
                f"  {'teacher' if s.role == 'scorer' else s.role:<7} {s.rank:>2}  node {info.node_ip} ({info.node_id[:8]})  bundle {s.bundle}  "
                f"GPU {gpus}  threads {self.threads(s)}"
            )
        return "\n".join(lines)


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in bundle.items()) + "}"


def _probe() -> dict:
    import ray

    ctx = ray.get_runtime_context()
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return dict(
        node_id=ctx.get_node_id(),
        node_ip=ray.util.get_node_ip_address(),
        gpu_ids=[int(g) for g in ray.get_gpu_ids()],
        cores=len(os.sched_getaffinity(0)),
        free_port=port,
    )
