"""The weight-sync guard through `train()`: a run whose engine is stale stops with WeightSyncError,
whether the push is checked by the next step's rollouts (the default: their log-probs against the
learner's scores of the same tokens) or by re-scoring after the push (grpo.track_mismatch=false
leaves no rollout gap to check with).

The staleness is injected from here, never through a hook in the library: the weight push (of
every transport: object store, shared memory, gloo broadcast) is wrapped so that it skips one reload, or turns the vLLM-CPU tied-embedding
repack off in the engines before pushing. The model is a tiny tied Qwen3 warmed up on `a+b=` so that rewards vary
and every step moves the weights (lr 1e-2: a step moves log-probs by far more than the guard's
limit, set to 1e-3 nats here; fp32 engines agree with the learner to ~1e-6).
"""
import json
import sys

import pytest
import ray

from rl.config import load_config
from rl.demo.tiny import addition_rows

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def warmed(warmed_addition_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("guard") / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(200, seed=5)))
    return warmed_addition_model, data


def _config(model, data, out, steps, transport, *extra):
    # On this one machine sync.backend=collective goes through shared memory unless told to broadcast.
    backend = {"object_store": ["sync.backend=object_store"], "shared_memory": ["sync.backend=collective"],
               "broadcast": ["sync.backend=collective", "sync.shared_memory=false"]}[transport]
    return load_config(None, [*backend, *extra,
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "grpo.group_size=4", f"train.steps={steps}",
        "train.prompts_per_step=8", "learner.micro_batch_size=32", "learner.lr=1e-2", "learner.warmup_steps=0",
        "sync.max_logprob_gap=1e-3", "train.save_final=false", "reward.workers=0",
        f"tracking.output_dir={out}", "tracking.run_name=run",
    ])


def _records(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# (transport, how the push is checked): each transport once, the default check twice and the
# re-scoring fallback once.
CASES = [("object_store", "rollouts"), ("shared_memory", "rollouts"), ("broadcast", "rescoring")]


@pytest.mark.parametrize("transport,check", CASES)
def test_an_engine_that_skips_one_reload_stops_the_run(warmed, ray_session, tmp_path, monkeypatch, transport, check):
    from rl.loop.trainer import train
    from rl.sync.check import WeightSyncError
    from rl.sync.weight_sync import CollectiveSync, SharedMemorySync
    from rollouts.pool import RolloutPool

    pushes = []
    if transport == "object_store":
        push = RolloutPool.load_weights

        def skipping_second_push(pool, state_dict):
            pushes.append(len(state_dict))
            if len(pushes) != 2:  # step 2's reload never happens: the engine keeps step 1's weights
                push(pool, state_dict)

        monkeypatch.setattr(RolloutPool, "load_weights", skipping_second_push)
    else:
        sync_class = SharedMemorySync if transport == "shared_memory" else CollectiveSync
        stream = sync_class.push

        def skipping_second_stream(sync):
            pushes.append(1)
            return stream(sync) if len(pushes) != 2 else {}

        monkeypatch.setattr(sync_class, "push", skipping_second_stream)
    model, data = warmed
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if check == "rescoring":
        # Step 1's push passed the check with an fp32-exact engine; step 2's (skipped) stopped the run.
        with pytest.raises(WeightSyncError, match=r"engine 0 disagrees with the learner by .* sync.max_logprob_gap=0.001"):
            train(_config(model, data, tmp_path, 3, transport, "grpo.track_mismatch=false"), run_dir)
        stopped_after, pushed = 1, 2
    else:
        # Step 2's rollouts, sampled after step 1's push, passed the check; step 3's, sampled after
        # step 2's skipped one, stopped the run.
        with pytest.raises(WeightSyncError, match=r"rollouts of step 3, .* disagree with the learner's log-probs of the "
                                                  r"same tokens by .* sync.max_logprob_gap=0.001"):
            train(_config(model, data, tmp_path, 3, transport), run_dir)
        stopped_after, pushed = 2, 3
    records = _records(run_dir)
    assert len(pushes) == pushed and [r["step"] for r in records] == list(range(1, stopped_after + 1))
    assert all(r["logprob_gap"] < 1e-4 for r in records) and records[0]["grad_norm"] > 0


def test_tied_embedding_repack_off_stops_the_run(warmed, ray_session, tmp_path, monkeypatch):
    """vLLM-CPU keeps a packed copy of the tied lm_head that a reload does not refresh when the
    push holds `embed_tokens` alone (as the collective backend, sending each parameter once, does;
    here through shared memory, the default on one machine).
    Step 1 pushes with the repack on, which step 2's rollouts must pass; step 2 with it off, which
    step 3's rollouts must catch."""
    from rl.loop.trainer import train
    from rl.sync.check import WeightSyncError
    from rl.sync.weight_sync import SharedMemorySync

    pushes = []
    stream = SharedMemorySync.push

    def push_with_repack_off_at_step_2(sync):
        pushes.append(1)
        repack = len(pushes) != 2  # the engine's own _needs_repack (tied model, CPU) is True
        sync.pool.apply(lambda engine: setattr(engine, "_needs_repack", repack))
        return stream(sync)

    monkeypatch.setattr(SharedMemorySync, "push", push_with_repack_off_at_step_2)
    model, data = warmed
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(WeightSyncError, match=r"tied-embedding repack"):
        train(_config(model, data, tmp_path, steps=3, transport="shared_memory"), run_dir)
    records = _records(run_dir)
    assert len(pushes) == 3 and [r["step"] for r in records] == [1, 2] and records[1]["logprob_gap"] < 1e-4
