"""Exact resume for OPSD (frozen and EMA teacher) and IGPO, as tests/integration/test_resume.py shows it for
GRPO: 2 steps in one go, and the same run resumed from step 1's checkpoint, give the same
records and weights.

OPSD's teacher must come back as it was: the frozen one is the initial model again (not the
checkpoint's policy), the EMA one is restored from the checkpoint (not restarted from the
initial model). IGPO's inpainting draws its hints from an RNG seeded by the group itself and
counts per step, so a resumed run must inpaint and replace exactly as the unbroken one.
"""
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rl.config import load_config
from rl.demo.tiny import addition_rows
from rl.models import resolve_model_path

pytestmark = pytest.mark.slow


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _untimed(record):
    return {k: v for k, v in record.items() if not k.startswith("time/") and k != "wall_time"}


def _whole_and_resumed(recipe, overrides, out):
    """Runs `whole` (2 steps, a checkpoint after each), then resumes a copy of it from step 1's
    checkpoint (what a crash during step 2 leaves, with step 2's record dropped on resume) to
    step 2 in a fresh trainer: the same as the 1 step + resume + 1 step of tests/integration/test_resume.py,
    one start-up cheaper. Returns both run directories."""
    from rl.loop.trainer import train

    cfg = load_config(recipe, [*overrides, "train.steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
                               f"tracking.output_dir={out}", "tracking.run_name=whole"])
    whole, resumed = out / "whole", out / "resumed"
    whole.mkdir()
    train(cfg, whole)
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000002")
    shutil.rmtree(resumed / "final")
    train(cfg, resumed, resume=True)
    return whole, resumed


def _assert_same_run(whole, resumed, initial_weights):
    a, b = _records(whole), _records(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for x, y in zip(a, b):
        x, y = _untimed(x), _untimed(y)
        assert x.keys() == y.keys()
        assert x == pytest.approx(y, abs=1e-6, rel=0), f"step {x['step']}"
    wa, wb = load_file(whole / "final/model.safetensors"), load_file(resumed / "final/model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    initial = load_file(initial_weights)
    assert max((wa[k].float() - initial[k].float()).abs().max().item() for k in wa) > 1e-4  # it trained
    return a


@pytest.fixture(scope="module")
def opsd_setup(tiny_model, tmp_path_factory):
    model, data = tiny_model, tmp_path_factory.mktemp("opsd_resume") / "train.jsonl"
    rows = [{**r, "problem": r["question"], "solution": f"{r['question']}{r['answer']}"} for r in addition_rows(100, seed=3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def test_opsd_resume_equals_one_run(opsd_setup, ray_session, tmp_path):
    # The EMA teacher, the only one with state of its own to save and restore (a frozen teacher is the
    # initial weights); a frozen one's resume is the same run without that state.
    model, data = opsd_setup
    overrides = [
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=200",
        "rollout.max_tokens=6", "rollout.kv_cache_gb=0.25", "learner.lr=1e-2", "learner.warmup_steps=0",
        "learner.micro_batch_size=32", "reward.workers=0", "train.prompts_per_step=8",
        "opsd.teacher.kind=ema", "opsd.teacher.ema_decay=0.5",
    ]
    whole, resumed = _whole_and_resumed("opsd_smollm2", overrides, tmp_path)
    records = _assert_same_run(whole, resumed, model / "model.safetensors")
    assert all(r["divergence"] > 0 for r in records)


def test_igpo_resume_equals_one_run(ray_session, tmp_path):
    # The recipe's own model (built once into the model cache, as tests/integration/
    # test_igpo_end_to_end.py uses it): right on about 30% of samples, so that groups of 8 are
    # mixed (a gradient) or all wrong (inpainting).
    model = Path(resolve_model_path(load_config("igpo_tiny").model.path))
    overrides = ["train.prompts_per_step=8", "learner.lr=1e-3", "eval.every_steps=0", "eval.at_start=false"]
    whole, resumed = _whole_and_resumed("igpo_tiny", overrides, tmp_path)
    records = _assert_same_run(whole, resumed, model / "model.safetensors")
    # Inpainting happened (else the IGPO part of the state is not exercised): groups were repaired.
    assert sum(r["igpo/inpainted"] for r in records) > 0, records
