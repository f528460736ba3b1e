"""Training runs (Ray + vLLM + DeepSpeed, tiny model) with misbehaving and custom-file rewards.

Rows are read in file order (data.shuffle=false): step 1 takes rows 0-3, step 2 rows 4-7, and
rows 1 and 6 carry flag=true, on which the fixture rewards hang, raise or return NaN. Each test
records what the scorer returned, so a score given to the wrong completion shows.
"""
import json

import pytest

from rewards.math import math_verify_reward
from rewards.scoring import RewardError, RewardScorer
from rl.config import load_config
from rl.core.paths import PROJECT_ROOT
from rl.demo.tiny import addition_rows

pytestmark = pytest.mark.slow

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "custom_reward.py"
FLAGGED = {1, 6}
GROUP = 4


@pytest.fixture(scope="module")
def flagged_setup(tiny_model, tmp_path_factory):
    root, model = tmp_path_factory.mktemp("reward_training"), tiny_model
    rows = [{**r, "flag": i in FLAGGED} for i, r in enumerate(addition_rows(64, seed=5))]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data, root


@pytest.fixture
def recorded(monkeypatch):
    """Every (completions, rows, result) the trainer's scorer returned."""
    calls = []
    original = RewardScorer.score

    def score(self, completions, rows, info=None):
        result = original(self, completions, rows, info)
        calls.append((completions, rows, result))
        return result

    monkeypatch.setattr(RewardScorer, "score", score)
    return calls


def _functions(*names_weights):
    items = ", ".join(f'{{name: "{FIXTURE}:{n}", weight: {w}}}' for n, w in names_weights)
    return f"reward.functions=[{items}]"


def _train(setup, name, extra, recipe=None):
    from rl.loop.trainer import train

    model, data, root = setup
    overrides = [
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "data.shuffle=false", "rollout.max_tokens=6", "rollout.kv_cache_gb=0.25", f"grpo.group_size={GROUP}",
        "train.steps=2", "train.prompts_per_step=4", "train.save_final=false", "learner.micro_batch_size=64",
        "learner.lr=1e-3", f"tracking.output_dir={root}", f"tracking.run_name={name}", "reward.workers=2", *extra,
    ]
    cfg = load_config(recipe, overrides)
    run_dir = root / name
    run_dir.mkdir()
    train(cfg, run_dir)
    return run_dir


def _records(run_dir, name):
    path = run_dir / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _row(setup, i):
    return json.loads(setup[1].read_text().splitlines()[i])


def test_custom_file_reward_named_in_a_recipe_with_a_hung_reward(flagged_setup, recorded, ray_session, tmp_path):
    recipe = tmp_path / "custom.yaml"
    recipe.write_text(
        "reward:\n  timeout_s: 1.0\n  functions:\n"
        f"    - {{name: '{FIXTURE}:short_and_right', weight: 1.0}}\n"
        f"    - {{name: '{FIXTURE}:sleep_on_flag', weight: 0.01}}\n"
    )
    run_dir = _train(flagged_setup, "hung", [], recipe=str(recipe))

    metrics = _records(run_dir, "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert [m["reward_timeouts"] for m in metrics] == [GROUP, GROUP]  # one flagged prompt a step
    assert all(m["reward_errors_scored_zero"] == 0 and "reward/correct" in m and "reward/brevity" in m for m in metrics)
    for completions, rows, result in recorded:
        for i, (text, row) in enumerate(zip(completions, rows)):
            hung = row["flag"]
            assert result.parts["sleep_on_flag"][i] == (0.0 if hung else float(len(text)))
            correct = math_verify_reward(text, row["answer"])
            assert result.parts["correct"][i] == correct
            assert result.totals[i] == pytest.approx(correct + 0.1 * (len(text) < 400) + (0 if hung else 0.01 * len(text)))
    failures = _records(run_dir, "reward_failures.jsonl")
    assert len(failures) == 2 * GROUP
    assert all(f["kind"] == "timeout" and f["reward"].endswith(":sleep_on_flag") and f["row"]["flag"] for f in failures)
    texts = {(s, t) for s, (c, _, _) in enumerate(recorded, 1) for t in c}
    assert all((f["step"], f["completion"]) in texts for f in failures)


@pytest.mark.parametrize("fn,match", [("raise_on_flag", "raised ZeroDivisionError"), ("nan_on_flag", "returned nan")])
def test_raising_or_nan_reward_stops_the_run(flagged_setup, recorded, ray_session, fn, match):
    with pytest.raises(RewardError, match=match) as err:
        _train(flagged_setup, fn, [_functions((fn, 1.0))])
    # Step 1 failed in scoring: row 1's completions are batch entries 4-7; the first is named.
    assert recorded == []
    message = str(err.value)
    assert f"{FIXTURE}:{fn}" in message and "completion 4: " in message and "'flag': True" in message
    assert f"'question': '{_row(flagged_setup, 1)['question']}'" in message
    assert not (flagged_setup[2] / fn / "metrics.jsonl").read_text().strip()


def test_errors_scored_zero_when_the_recipe_asks(flagged_setup, recorded, ray_session):
    extra = [_functions(("raise_on_flag", 1.0), ("nan_on_flag", 1.0)), "reward.on_error=zero"]
    run_dir = _train(flagged_setup, "zero", extra)
    metrics = _records(run_dir, "metrics.jsonl")
    assert [m["reward_errors_scored_zero"] for m in metrics] == [2 * GROUP, 2 * GROUP]
    assert [m["reward_timeouts"] for m in metrics] == [0, 0]
    for completions, rows, result in recorded:
        for i, (text, row) in enumerate(zip(completions, rows)):
            want = 0.0 if row["flag"] else float(len(text))
            assert result.parts["raise_on_flag"][i] == result.parts["nan_on_flag"][i] == want
            assert result.totals[i] == 2 * want
    failures = _records(run_dir, "reward_failures.jsonl")
    assert len(failures) == 4 * GROUP and all(f["kind"] == "error" and f["row"]["flag"] for f in failures)
    assert {f["reward"].rsplit(":", 1)[1] for f in failures} == {"raise_on_flag", "nan_on_flag"}
