"""The collective weight sync (a gloo broadcast, or a shared-memory file on one node): what the
engines hold after a push is the learner's weights, bit for bit, and the after-push log-prob check
still catches an engine left stale.

The HF engine keeps a plain transformers model, so its weights can be read back and compared
exactly with the learner's `full_state_dict` (the object-store path's dict). vLLM's weights are
repacked and fused, so there the proof is the log-prob check itself, on a tied model (the case
where vLLM-CPU silently keeps a stale output layer unless it is repacked after the reload).
"""
from __future__ import annotations

import sys

import pytest
import ray
import torch

from rl.config import LearnerConfig, LoraConfig
from rl.learner.group import LearnerGroup
from rl.demo.tiny import build_model
from rl.sync.check import WeightSyncError, check_weight_sync
from rl.sync.weight_sync import CollectiveSync, ObjectStoreSync, SharedMemorySync
from rollouts import RolloutPool
from tests.batches import varied_batch

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BATCH = varied_batch(3, 1.0)
LORA = LoraConfig(enabled=True, rank=4, alpha=8.0)


def pg_loss(out, mb):
    logp = torch.log_softmax(out.logits(), dim=-1).gather(-1, mb.completion_ids[..., None]).squeeze(-1)
    return -(mb.token_fields["advantages"] * logp * mb.completion_mask).sum() / mb.loss_normalizer, {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync_models")
    return {
        "tied": str(build_model(root / "tied", arch="qwen3", tied=True)),
        "untied": str(build_model(root / "untied", arch="llama", tied=False)),
    }


def engine_state(pool) -> list[dict[str, torch.Tensor]]:
    return pool.apply(lambda e: {k: v.detach().clone() for k, v in e.model.state_dict().items()})


def differing(engine: dict, learner: dict) -> list[str]:
    return [k for k in learner if not torch.equal(engine[k], learner[k])]


# tied/untied x ZeRO-2/3 x LoRA on/off, in four runs that cover every value of each factor and
# every pair of tied/ZeRO; the ZeRO-3 runs have two ranks, so gathers really span ranks.
CASES = [("tied", 3, False), ("untied", 2, False), ("tied", 2, True), ("untied", 3, True)]


@pytest.mark.parametrize("model,stage,lora", CASES, ids=[f"{m}-zero{s}-{'lora' if l else 'full'}" for m, s, l in CASES])
def test_collective_push_is_bit_exact(ray_session, models, model, stage, lora):
    path = models[model]
    learners = LearnerGroup(
        path, LearnerConfig(num_learners=2 if stage == 3 else 1, zero_stage=stage, lr=1e-2, micro_batch_size=2),
        "float32", seed=0, total_steps=2, lora=LORA if lora else None,
    )
    pool = RolloutPool("hf", path, num_engines=2, max_model_len=64, timeout_s=300)
    try:
        sync = CollectiveSync(pool, learners, bucket_mb=0.05)  # small buckets: many broadcasts
        learners.train_step(BATCH, pg_loss)
        want = learners.full_state_dict()
        assert differing(engine_state(pool)[0], want), "the step should have moved the weights"
        metrics = sync.push()
        assert metrics["sync_buckets"] > 1
        for got in engine_state(pool):
            assert not differing(got, want)
        if lora:
            # Only the adapted layers travel: far fewer bytes than the model.
            assert metrics["sync_bytes"] < 0.9 * sum(t.numel() * t.element_size() for t in want.values())
        # A second step and push: the group carries on.
        learners.train_step(BATCH, pg_loss)
        sync.push()
        want = learners.full_state_dict()
        assert all(not differing(got, want) for got in engine_state(pool))
        # The same through shared memory, twice: the file is rewritten in place.
        shared = SharedMemorySync(pool, learners)
        for _ in range(2):
            learners.train_step(BATCH, pg_loss)
            want = learners.full_state_dict()
            assert all(differing(got, want) for got in engine_state(pool))
            metrics = shared.push()
            assert all(not differing(got, want) for got in engine_state(pool))
        if lora:
            assert metrics["sync_bytes"] < 0.9 * sum(t.numel() * t.element_size() for t in want.values())
    finally:
        pool.close()
        learners.close()


def test_a_replaced_engine_joins_a_new_group(ray_session, models):
    """An engine restarted mid-run was no member of the group: a new group, formed by every engine
    (the survivor too) and learner rank 0, carries the next push to both."""
    path = models["untied"]
    learners = LearnerGroup(path, LearnerConfig(lr=1e-2, micro_batch_size=8), "float32", seed=0, total_steps=2)
    pool = RolloutPool("hf", path, num_engines=2, max_model_len=64, timeout_s=300)
    try:
        CollectiveSync(pool, learners).push()
        pool.restart(1)
        learners.train_step(BATCH, pg_loss)
        want = learners.full_state_dict()
        assert all(differing(got, want) for got in engine_state(pool))  # the new engine: the model's start
        CollectiveSync(pool, learners, bucket_mb=0.05).push()
        assert all(not differing(got, want) for got in engine_state(pool))
    finally:
        pool.close()
        learners.close()


def test_check_catches_an_engine_that_dropped_the_push(ray_session, models):
    path = models["untied"]
    learners = LearnerGroup(path, LearnerConfig(lr=1e-2, micro_batch_size=8), "float32", seed=0, total_steps=2)
    pool = RolloutPool("hf", path, num_engines=2, max_model_len=64, timeout_s=300)
    try:
        sync = CollectiveSync(pool, learners)
        learners.train_step(BATCH, pg_loss)
        sync.push()
        assert check_weight_sync(pool, learners, BATCH, 3, 1e-3)["logprob_gap"] < 1e-5

        def drop_loads(engine):
            engine.load_weights = lambda named: None  # receives the stream, loads nothing

        ray.get(pool._actors[1].apply.remote(drop_loads))
        learners.train_step(BATCH, pg_loss)
        sync.push()
        with pytest.raises(WeightSyncError, match="engine 1 disagrees with the learner"):
            check_weight_sync(pool, learners, BATCH, 3, 1e-3)
    finally:
        pool.close()
        learners.close()


def test_vllm_collective_push_then_check(ray_session, models):
    """vLLM-CPU, tied model: the streamed (or shared-memory) in-place reload plus the output-layer
    repack give the learner's log-probs; without the repack the check stops the run."""
    path = models["tied"]
    learners = LearnerGroup(path, LearnerConfig(lr=3e-2, micro_batch_size=8), "float32", seed=0, total_steps=3)
    pool = RolloutPool("vllm", path, num_engines=1, max_model_len=64, kv_cache_gb=0.25, timeout_s=300)
    try:
        sync = CollectiveSync(pool, learners)
        for _ in range(2):
            learners.train_step(BATCH, pg_loss)
        sync.push()
        assert check_weight_sync(pool, learners, BATCH, 5, 1e-3)["logprob_gap"] < 1e-4
        # The object-store fallback lands in the same place.
        ObjectStoreSync(pool, learners).push()
        assert check_weight_sync(pool, learners, BATCH, 5, 1e-3)["logprob_gap"] < 1e-4
        # So does shared memory, after another step.
        learners.train_step(BATCH, pg_loss)
        SharedMemorySync(pool, learners).push()
        assert check_weight_sync(pool, learners, BATCH, 5, 1e-3)["logprob_gap"] < 1e-4
        pool.apply(lambda e: setattr(e, "_needs_repack", False))  # set for a tied model on CPU: no repack now
        learners.train_step(BATCH, pg_loss)
        sync.push()
        with pytest.raises(WeightSyncError, match="engine 0 disagrees"):
            check_weight_sync(pool, learners, BATCH, 5, 1e-3)
    finally:
        pool.close()
        learners.close()
