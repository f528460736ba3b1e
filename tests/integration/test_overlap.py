"""train.max_staleness=1: the next step's rollouts are generated while the learner trains.

No batch is trained on with weights more than one version older than the learner's, and the
overlap keeps runs reproducible: the same seed gives the same metrics twice, and a run stopped
mid-way and resumed equals one that never stopped.
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


def _run(model, data, root, name, extra=(), resume=False, stop=None):
    from rl.loop.trainer import train

    cfg = load_config(None, _overrides(model, data, root, name, extra))
    run_dir = root / name
    run_dir.mkdir(parents=True, exist_ok=resume)
    train(cfg, run_dir, resume=resume, stop=stop)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class StopBefore:
    """Asks the loop to stop at the top of step `step` (as a first Ctrl-C during step - 1 would)."""

    exit_code = 130

    def __init__(self, step: int):
        self.step, self.checks = step, 0

    @property
    def requested(self) -> bool:
        self.checks += 1  # the loop asks once at the top of every step
        return self.checks >= self.step


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


def test_overlapped_run_resumes_exactly(ray_session, tmp_path):
    """Stopped before step 3 (its rollouts already generated, one version old), then resumed: the
    same 4 steps as a run that never stopped. The checkpoint is the interrupt's own, or the
    scheduled one of step 2 (the interrupt then saves nothing more)."""
    from rl.loop import checkpoint
    from rl.loop.stopped import RunStopped

    model, data = addition_task(tmp_path / "task", warmup_steps=30, n_rows=256)
    overlap = ["train.max_staleness=1", "train.steps=4"]
    whole = _run(model, data, tmp_path, "whole", overlap)
    assert len({r["loss"] for r in whole}) == 4  # four different batches
    for saved_by, every in [("interrupt", 0), ("schedule", 2)]:
        extra = [*overlap, f"checkpoint.every_steps={every}"]
        with pytest.raises(RunStopped, match="Stopped after step 2"):
            _run(model, data, tmp_path, saved_by, extra, stop=StopBefore(3))
        saved = checkpoint.newest(tmp_path / saved_by)
        assert saved.name == "step_000002" and (saved / checkpoint.AHEAD_FILE).exists(), saved_by
        split = _run(model, data, tmp_path, saved_by, extra, resume=True)
        assert [r["batch_age"] for r in split] == [0, 1, 1, 1]
        assert _without_timings(split) == _without_timings(whole), saved_by
