"""Placement: the resource plan, checked against Ray clusters that declare GPUs they do not have.

Ray sets CUDA_VISIBLE_DEVICES for an actor from the GPUs it assigns, whether or not they exist, so
each actor's GPU indices can be read here. The fake-GPU clusters run in a subprocess (this file run
as a script): the test session's own Ray (ray_session) has no GPUs and must not be replaced.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rl.core.paths import PROJECT_ROOT
from rl.loop.placement import BundleInfo, PlacementError, ResourcePlan

pytestmark = pytest.mark.slow


def plan(**kw) -> ResourcePlan:
    base = dict(num_engines=2, gpus_per_engine=1, engine_cpus=1, num_learners=2, learner_cpus=1, mode="split", on_gpu=True)
    return ResourcePlan.build(**{**base, **kw})


def test_plan_shapes():
    split = plan(gpus_per_engine=2)
    assert split.needs() == {"CPU": 4, "GPU": 6}  # 2 engines x 2 GPUs + 2 learners x 1
    assert len(split.bundles) == 4 and {s.bundle for s in split.engines}.isdisjoint(s.bundle for s in split.learners)
    co = plan(mode="colocate", num_learners=3)
    # Engine i shares bundle i with learner i; learner 2 has a bundle of its own.
    assert [s.bundle for s in co.engines] == [0, 1] and [s.bundle for s in co.learners] == [0, 1, 2]
    assert co.needs()["GPU"] == 3 and all(s.num_gpus == 0 for s in co.engines)
    cpu = plan(on_gpu=False)
    assert "GPU" not in cpu.needs() and cpu.needs()["CPU"] == 4
    # A teacher on engines of its own: bundles after the others, in either mode.
    for mode, learners in (("split", 2), ("colocate", 2)):
        taught = plan(mode=mode, num_learners=learners, scorer_gpus=(2, 2))
        assert [s.bundle for s in taught.scorers] == [len(taught.bundles) - 2, len(taught.bundles) - 1]
        assert all(taught.bundles[s.bundle] == {"CPU": 1, "GPU": 2.0} for s in taught.scorers)
        others = {s.bundle for s in taught.engines + taught.learners}
        assert others.isdisjoint(s.bundle for s in taught.scorers)


def test_plan_that_does_not_fit_is_refused():
    with pytest.raises(PlacementError, match=r"needs 6 GPU and 4 CPU .* The cluster has: node 0: 8 CPU, 4 GPU"):
        plan(gpus_per_engine=2).check_fits([{"CPU": 8, "GPU": 4}])
    # Three GPUs in total, as needed, but an engine's 2 GPUs must be on one node.
    with pytest.raises(PlacementError, match=r"bundle \d \(\{CPU: 1, GPU: 2\}\) fits no node"):
        plan(num_engines=1, gpus_per_engine=2, num_learners=1).check_fits([{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}])
    with pytest.raises(PlacementError, match=r"learner.num_learners >= 4, got 2"):
        plan(mode="colocate", gpus_per_engine=2)
    plan(num_engines=1, gpus_per_engine=2, num_learners=1).check_fits([{"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 2}])


def test_threads_split_the_cores_when_roles_overlap():
    """One 8-core node, one engine and two learner ranks. Taking turns, the engine gets all 8 and
    the learners 4 each; overlapping (train.max_staleness >= 1), the three share the 8 cores."""
    for overlap, engine, learner in [(False, 8, 4), (True, 2, 2)]:
        p = plan(on_gpu=False, num_engines=1, num_learners=2, overlap=overlap)
        p.info = [BundleInfo("node-a", "10.0.0.1", [], 8, 0) for _ in p.bundles]
        assert p.threads(p.engines[0]) == engine
        assert [p.threads(s) for s in p.learners] == [learner, learner]


def test_weight_transport_follows_the_plan(monkeypatch):
    """sync.backend=collective moves bytes GPU to GPU (NCCL) between split GPUs, through a shared-memory
    file where they cross host memory on learner rank 0's node, and over gloo across nodes."""
    import rl.sync.weight_sync as ws
    from rl.config import SyncConfig

    class Broadcast:
        def __init__(self, pool, learners, bucket_mb, nccl):
            self.nccl = nccl

    monkeypatch.setattr(ws, "CollectiveSync", Broadcast)

    def chosen(backend="collective", shared_memory=True, engine_node="node-a", **kw):
        p = plan(num_engines=1, num_learners=1, **kw)
        p.info = [BundleInfo("node-a", "10.0.0.1", [0], 8, 0) for _ in p.bundles]
        p.info[p.engines[0].bundle] = BundleInfo(engine_node, "10.0.0.2", [1], 8, 0)
        sync = ws.build_weight_sync(SyncConfig(backend=backend, shared_memory=shared_memory), None, None, p)
        return type(sync).__name__ + ("(nccl)" if getattr(sync, "nccl", False) else "")

    assert chosen(on_gpu=False) == "SharedMemorySync"
    assert chosen(on_gpu=True, mode="colocate") == "SharedMemorySync"
    assert chosen(on_gpu=True, mode="split") == "Broadcast(nccl)"
    assert chosen(on_gpu=False, engine_node="node-b") == "Broadcast"
    assert chosen(on_gpu=False, shared_memory=False) == "Broadcast"
    assert chosen(on_gpu=False, backend="object_store") == "ObjectStoreSync"


# ---------------------------------------------------------------------------------------------
# Fake-GPU clusters (subprocess)


def _run_cases(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.run(
        [sys.executable, __file__, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def recorded():
    return _run_cases("recorders")


def _visible(record) -> set[str]:
    return set(filter(None, (record["cuda_visible_devices"] or "").split(",")))


@pytest.mark.parametrize("mode", ["split", "colocate"])
@pytest.mark.parametrize("gpus_per_engine", [1, 2])
def test_engines_and_learners_get_their_gpus(recorded, mode, gpus_per_engine):
    case = recorded[f"{mode}-{gpus_per_engine}"]
    engines, learners = case["engines"], case["learners"]
    for e in engines:
        assert len(_visible(e)) == gpus_per_engine, e
        assert _visible(e) == {str(g) for g in e["plan_gpus"]}  # what the launch printed is what it got
    for a, b in [(a, b) for i, a in enumerate(engines) for b in engines[i + 1 :]]:
        assert not _visible(a) & _visible(b), "two engines share a GPU"
    learner_gpus = [tuple(sorted(_visible(r))) for r in learners]
    assert all(len(g) == 1 for g in learner_gpus) and len(set(learner_gpus)) == len(learners), learner_gpus
    assert all(_visible(r) == {str(g) for g in r["plan_gpus"]} for r in learners)
    used_by_learners = {g[0] for g in learner_gpus}
    for e in engines:
        if mode == "split":
            # Ray itself assigned them (and accounts for them), apart from every learner's.
            assert not _visible(e) & used_by_learners and e["ray_gpu_ids"] == sorted(e["plan_gpus"])
        else:
            # Exactly the GPUs of the learner ranks it is colocated with.
            i = e["rank"]
            mine = {next(iter(_visible(r))) for r in learners if i * gpus_per_engine <= r["rank"] < (i + 1) * gpus_per_engine}
            assert _visible(e) == mine
    assert "placement=" + mode in case["table"] and case["table"].count("engine") == len(engines)


def test_a_teacher_on_engines_gets_gpus_of_its_own(recorded):
    """Colocated engines and learners on GPUs 0-1 of a plan that also holds a 2-GPU teacher engine:
    the teacher's GPUs are its own, and the printed plan names them."""
    case = recorded["teacher"]
    teacher = case["scorers"][0]
    assert len(_visible(teacher)) == 2 and _visible(teacher) == {str(g) for g in teacher["plan_gpus"]}
    others = set().union(*(_visible(r) for r in case["engines"] + case["learners"]))
    assert others and not others & _visible(teacher)
    assert "teacher  0  node" in case["table"] and f"GPU {','.join(map(str, teacher['plan_gpus']))}" in case["table"]


def test_threads_follow_the_node_cores(recorded):
    case = recorded["split-1"]
    cores = case["cores"]
    # Two engines (and two learners) share the node's cores; Ray alone would give each 1 thread.
    assert [e["torch_threads"] for e in case["engines"]] == [max(1, cores // 2)] * 2
    assert [r["omp"] for r in case["learners"]] == [str(max(1, cores // 2))] * 2


def test_cluster_too_small_is_refused_before_any_actor(recorded):
    msg = recorded["too_small"]
    assert "does not fit the Ray cluster" in msg and "It needs 5 GPU" in msg and "4 GPU" in msg


def test_real_pool_and_learners_are_placed():
    """RolloutPool and LearnerGroup themselves, colocated: one 2-GPU engine with learner ranks 0-1."""
    case = _run_cases("real")
    learners = case["learners"]
    assert sorted(r["cuda_visible_devices"] for r in learners) == ["0", "1"]
    assert _visible(case["engines"][0]) == {"0", "1"}
    # The ranks met at rank 0's node address, not 127.0.0.1, and trained a step together.
    assert all(r["master_addr"] == case["rank0_ip"] != "127.0.0.1" for r in learners)
    assert case["loss_finite"]


# ---------------------------------------------------------------------------------------------
# The subprocess side


class _Recorder:
    def __init__(self, role: str, rank: int):
        self.role, self.rank = role, rank

    def record(self) -> dict:
        import ray
        import torch

        return dict(
            role=self.role, rank=self.rank, ray_gpu_ids=sorted(int(g) for g in ray.get_gpu_ids()),
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), omp=os.environ.get("OMP_NUM_THREADS"),
            torch_threads=torch.get_num_threads(),
        )


def _recorders() -> dict:
    import ray

    ray.init(address="local", num_cpus=8, num_gpus=8, include_dashboard=False, log_to_driver=False)
    out = {}
    for mode in ("split", "colocate"):
        for g in (1, 2):
            p = ResourcePlan.build(
                num_engines=2, gpus_per_engine=g, engine_cpus=1, num_learners=2 * g if mode == "colocate" else 2,
                learner_cpus=0.5, mode=mode, on_gpu=True,
            ).apply()
            actors = [
                ray.remote(**p.actor_options(s))(_Recorder).remote(s.role, s.rank) for s in p.engines + p.learners
            ]
            records = ray.get([a.record.remote() for a in actors])
            for r, s in zip(records, p.engines + p.learners):
                r["plan_gpus"] = p.gpu_ids(s)
            out[f"{mode}-{g}"] = dict(
                engines=[r for r in records if r["role"] == "engine"],
                learners=[r for r in records if r["role"] == "learner"],
                table=p.table(), cores=p.info[0].cores,
            )
            for a in actors:
                ray.kill(a)
            p.release()
    p = ResourcePlan.build(num_engines=1, gpus_per_engine=2, engine_cpus=1, num_learners=2, learner_cpus=0.5,
                           mode="colocate", on_gpu=True, scorer_gpus=(2,)).apply()
    slots = p.engines + p.learners + p.scorers
    actors = [ray.remote(**p.actor_options(s))(_Recorder).remote(s.role, s.rank) for s in slots]
    records = ray.get([a.record.remote() for a in actors])
    for r, s in zip(records, slots):
        r["plan_gpus"] = p.gpu_ids(s)
    out["teacher"] = {role: [r for r in records if r["role"] == role[:-1]] for role in ("engines", "learners", "scorers")}
    out["teacher"]["table"] = p.table()
    for a in actors:
        ray.kill(a)
    p.release()
    try:
        ResourcePlan.build(
            num_engines=2, gpus_per_engine=2, engine_cpus=1, num_learners=1, learner_cpus=1, mode="split", on_gpu=True
        ).check_fits([{"CPU": 8, "GPU": 4}])
    except PlacementError as e:
        out["too_small"] = str(e)
    ray.shutdown()
    return out


def _logprob_loss(out, mb):
    import torch

    logp = torch.log_softmax(out.logits(), dim=-1).gather(-1, mb.completion_ids[..., None]).squeeze(-1)
    return -(logp * mb.completion_mask).sum() / mb.loss_normalizer, {}


def _real() -> dict:
    import tempfile

    import ray

    from rl.config import LearnerConfig
    from rl.learner.group import LearnerGroup
    from rl.demo.tiny import build_model
    from rollouts.pool import RolloutPool
    from tests.batches import varied_batch

    model = str(build_model(tempfile.mkdtemp() + "/m", arch="llama", tied=False))
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    p = ResourcePlan.build(
        num_engines=1, gpus_per_engine=2, engine_cpus=1, num_learners=2, learner_cpus=1, mode="colocate", on_gpu=True
    ).apply()
    pool = RolloutPool("hf", model, placement=p, max_model_len=64)
    learners = LearnerGroup(model, LearnerConfig(num_learners=2, micro_batch_size=2), "float32", seed=0, total_steps=1, placement=p)

    def learner_record(worker):
        return dict(cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), master_addr=os.environ["MASTER_ADDR"])

    metrics = learners.train_step(varied_batch(0, 1.0), _logprob_loss)
    out = dict(
        engines=pool.apply(lambda engine: dict(cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))),
        learners=ray.get([w.__ray_call__.remote(learner_record) for w in learners.workers]),
        rank0_ip=p.master_address()[0], loss_finite=bool(metrics["loss"] == metrics["loss"]),
    )
    pool.close()
    learners.close()
    p.release()
    ray.shutdown()
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))
    result = {"recorders": _recorders, "real": _real}[sys.argv[1]]()
    print(json.dumps(result))
