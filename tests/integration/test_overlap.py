"""train.max_staleness=1: the next step's rollouts are generated while the learner trains.

No batch is trained on with weights more than one version older than the learner's, and the
overlap keeps runs reproducible: the same seed gives the same metrics twice.
"""
import json

import pytest

from rl.config import ConfigError, load_config
from rl.demo.tiny import addition_task

pytestmark = pytest.mark.slow

TIMINGS = ("time/", "wall_time")


def _overrides(model, data, out, name, extra=()):
    return [
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "grpo.group_size=4", "train.steps=3",
        "train.prompts_per_step=8", "learner.micro_batch_size=32", "learner.lr=1e-3", "train.save_final=false",
        "grpo.importance_sampling=token", f"tracking.output_dir={out}", f"tracking.run_name={name}", *extra,
    ]


def _run(model, data, root, name, extra=()):
    from rl.loop.trainer import train

    cfg = load_config(None, _overrides(model, data, root, name, extra))
    run_dir = root / name
    run_dir.mkdir(parents=True)
    train(cfg, run_dir)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timings(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIMINGS)} for r in records]


def test_overlap_ages_and_reproducibility(ray_session, tmp_path):
    model, data = addition_task(tmp_path / "task", warmup_steps=30, n_rows=256)
    first = _run(model, data, tmp_path, "a", ["train.max_staleness=1"])
    second = _run(model, data, tmp_path, "b", ["train.max_staleness=1"])
    # Step 1 is sampled with the initial weights it trains from; every later batch with weights
    # one update behind the learner's.
    assert [r["batch_age"] for r in first] == [0, 1, 1]
    assert _without_timings(first) == _without_timings(second)
    assert all(r["logprob_gap"] < 1e-4 for r in first)
    on_policy = _run(model, data, tmp_path, "c")
    assert [r["batch_age"] for r in on_policy] == [0, 0, 0]
    # Step 1 is the same batch either way; step 2 is not (sampled with older weights).
    assert on_policy[0]["reward"] == first[0]["reward"]


def test_overlap_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match=r"train.max_staleness=1 needs ray.placement=split .*reward.workers >= 1"):
        load_config(None, ["train.max_staleness=1", "ray.placement=colocate", "reward.workers=0"])
