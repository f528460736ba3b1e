"""OPSD: batch construction, teacher/student alignment, recipes, and a real run on a tiny model."""
import json
import os
import subprocess
import sys

import pytest
import torch

from rl.algorithms import Rollouts, build_algorithm
from rl.config import load_config
from rl.core.paths import PROJECT_ROOT
from rl.data import build_prompt, build_teacher_prompt
from rl.demo.tiny import addition_rows
from rl.core.types import Completion


def _rows(n):
    return [{**r, "problem": r["question"], "solution": f"{r['question']}{r['answer']}"} for r in addition_rows(n, seed=3)]


def test_batch_pairs_each_completion_with_its_teacher_context(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config("opsd_smollm2", ["data.prompt_format=chat"])
    algo = build_algorithm(cfg)
    algo.attach_tokenizer(tok)
    rows = _rows(3)
    prompts = [build_prompt(r, cfg.data, tok) for r in rows]
    completions = [[Completion(p, [5 + i, 6, tok.eos_token_id], "x", [-1.0] * 3, "stop")] for i, p in enumerate(prompts)]
    batch, _ = algo.build_batch(Rollouts(rows, prompts, completions, [[0.0]] * 3))
    for i, row in enumerate(rows):
        teacher_prompt = build_teacher_prompt(row, cfg.data, tok, cfg.opsd.teacher_template, cfg.opsd.teacher_instruction, True)
        assert batch.teacher_input_ids[i] == teacher_prompt + completions[i][0].token_ids
        assert batch.input_ids[i] == prompts[i] + completions[i][0].token_ids
        # The teacher sees the reference solution; the student does not.
        assert row["solution"] in tok.decode(batch.teacher_input_ids[i]) and row["solution"] not in tok.decode(prompts[i])
    assert batch.completion_lens() == batch.teacher_view().completion_lens() == [3, 3, 3]
    assert batch.loss_normalizer == 3  # paper aggregation: mean over sequences


def test_gpu_recipe_dry_run_and_offline_launch():
    dry = subprocess.run([sys.executable, "-m", "rl.launch", "recipe=opsd_qwen", "--dry-run", "--print-config"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "Qwen/Qwen3-1.7B" in dry.stdout and "algorithm: opsd" in dry.stdout
    real = subprocess.run([sys.executable, "-m", "rl.launch", "recipe=opsd_qwen", "tracking.output_dir=/tmp/rl-offline"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert real.returncode == 2, real.stderr[-2000:]
    assert "Qwen/Qwen3-1.7B" in real.stderr and "hub" in real.stderr and "Traceback" not in real.stderr


@pytest.mark.slow
def test_opsd_run_lowers_divergence(tiny_model, tmp_path, ray_session):
    """The real loop (vLLM rollouts, DeepSpeed learner with a frozen teacher): the student moves
    toward the teacher, so the per-token divergence on fresh rollouts falls."""
    from rl.loop.trainer import train

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(500)))
    cfg = load_config("opsd_smollm2", [
        f"model.path={tiny_model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=200",
        "rollout.max_tokens=8", "rollout.kv_cache_gb=0.25", "opsd.clip=null", "learner.lr=3e-3",
        "learner.max_grad_norm=1.0", "learner.warmup_steps=0", "learner.micro_batch_size=32", "reward.workers=0",
        "train.steps=12", "train.prompts_per_step=32", f"tracking.output_dir={tmp_path}", "tracking.run_name=run",
    ])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(cfg, run_dir)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    div = [r["divergence"] for r in records]
    print("divergence per step:", [round(d, 4) for d in div])
    assert all(torch.isfinite(torch.tensor(div)))
    assert sum(div[-3:]) / 3 < 0.7 * sum(div[:3]) / 3, div
    assert all(r["logprob_gap"] < 1e-4 for r in records)
