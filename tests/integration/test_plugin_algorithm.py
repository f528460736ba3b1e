"""A new algorithm from a user's file, with no edit to the library: REINFORCE with a leave-one-out
baseline (tests/fixtures/reinforce_rloo.py, copied outside the project), named in a recipe
override as `algorithm=<file>.py:Class`, trains a tiny model one step through the real loop
(vLLM rollouts, DeepSpeed learner, Ray)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rl.config import load_config
from rl.demo.tiny import addition_task

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE = FIXTURES / "reinforce_rloo.py"


def test_algorithm_from_a_file_outside_the_package_trains_one_step(ray_session, tmp_path, monkeypatch):
    from rl.learner.group import LearnerGroup
    from rl.loop.trainer import train

    model, data = addition_task(tmp_path / "task", warmup_steps=60, n_rows=200)  # partly right: rewards vary
    plugin = tmp_path / "elsewhere" / "my_reinforce.py"
    plugin.parent.mkdir()
    shutil.copy(FIXTURE, plugin)
    cfg = load_config(None, [
        f"algorithm={plugin}:ReinforceRLOO", "reinforce.group_size=4",
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "train.steps=1", "train.prompts_per_step=8",
        "learner.micro_batch_size=32", "learner.lr=1e-2", "reward.workers=0",
        f"tracking.output_dir={tmp_path}", "tracking.run_name=run",
    ])
    assert cfg.reinforce.group_size == 4 and not hasattr(cfg, "grpo")

    seen = []
    step = LearnerGroup.train_step

    def recording_step(group, batch, loss_fn, *args, **kwargs):
        seen.append((batch, loss_fn))
        return step(group, batch, loss_fn, *args, **kwargs)

    monkeypatch.setattr(LearnerGroup, "train_step", recording_step)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(cfg, run_dir)

    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["mean_abs_advantage"] > 0 and record["grad_norm"] > 0 and torch.isfinite(torch.tensor(record["loss"]))
    (batch, loss_fn), = seen
    assert type(loss_fn).__name__ == "ReinforceLoss"  # the file's own loss reached the learner
    # RLOO advantages: within each group of 4, A_i = r_i - mean of the other three, so they sum to 0.
    firsts = [row[0] for row in batch.token_fields["advantages"]]
    for g in range(0, len(firsts), 4):
        assert abs(sum(firsts[g : g + 4])) < 1e-5
    # One optimizer step moved the weights.
    before, after = load_file(model / "model.safetensors"), load_file(run_dir / "final" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # The config as rl.launch saves it names the file, so the run can be resumed or re-launched from it.
    (tmp_path / "saved.yaml").write_text(cfg.to_yaml())
    saved = load_config(str(tmp_path / "saved.yaml"))
    assert saved.algorithm == f"{plugin}:ReinforceRLOO" and saved.reinforce.group_size == 4


def test_names_a_plugin_registers_train_one_step_on_two_learner_ranks(ray_session, tmp_path, monkeypatch):
    """An advantage, a policy loss, an algorithm and an engine registered by a `plugins` file (copied
    outside the project) are picked by name, and one step trains with them on a 2-rank learner: the
    engine samples in its actor, the loss runs in both ranks (pickled by value: no rank could import
    the file by a module name)."""
    from rl.algorithms import build_algorithm
    from rl.learner.group import LearnerGroup
    from rl.loop.trainer import train
    from rollouts.pool import RolloutPool

    model, data = addition_task(tmp_path / "task", warmup_steps=60, n_rows=200)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("registering_plugin.py", "plain_sampler_engine.py"):
        shutil.copy(FIXTURES / name, elsewhere / name)
    cfg = load_config(None, [
        f"plugins=[{elsewhere / 'registering_plugin.py'}]", "algorithm=plugin_grpo", "plugin_grpo.group_size=4",
        "plugin_grpo.advantage=plugin_sign", "plugin_grpo.policy_loss=plugin_plain", "plugin_grpo.updates_per_batch=1",
        "rollout.engine=plugin_sampler", "rollout.plain_sampler.batch_size=8",
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.max_tokens=4", "train.steps=1", "train.prompts_per_step=4", "learner.num_learners=2",
        "learner.micro_batch_size=8", "learner.lr=1e-2", "reward.workers=0", "sync.backend=object_store",
        f"tracking.output_dir={tmp_path}", "tracking.run_name=run",
    ])
    assert type(build_algorithm(cfg)).__name__ == "PluginGRPO" and cfg.rollout.plain_sampler.batch_size == 8
    seen = {"engines": [], "steps": []}
    generate, step = RolloutPool.generate, LearnerGroup.train_step

    def recording_generate(pool, *args, **kwargs):
        seen["engines"].append(pool.engine_class.__name__)
        return generate(pool, *args, **kwargs)

    def recording_step(group, batch, loss_fn, *args, **kwargs):
        seen["steps"].append((len(group.workers), batch, loss_fn))
        return step(group, batch, loss_fn, *args, **kwargs)

    monkeypatch.setattr(RolloutPool, "generate", recording_generate)
    monkeypatch.setattr(LearnerGroup, "train_step", recording_step)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(cfg, run_dir)

    assert seen["engines"] == ["PlainSampler"]
    (ranks, batch, loss_fn), = seen["steps"]
    assert ranks == 2 and loss_fn.policy_loss.__name__ == "plain_policy_gradient"
    assert {row[0] for row in batch.token_fields["advantages"]} <= {-1.0, 0.0, 1.0}  # the plug-in's estimator
    (record,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["grad_norm"] > 0 and record["clip_fraction"] == 0.0  # the plug-in's loss never clips
