"""The SFT baseline (python -m rl.sft, TRL's SFTTrainer): examples built from the RL recipes' own
prompt, training only on the solution, and a tiny model that really learns offline."""
from __future__ import annotations

import json
import math

import pytest
import torch

from rl.config import load_config
from rl.sft import main, sft_examples

ROWS = [{"problem": f"{a}+{b}=", "solution": f"{a}+{b} is {a + b}.", "answer": str(a + b)}
        for a in range(1, 7) for b in range(1, 5)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _overrides(model, data, out, steps=12):
    return [f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=32",
            f"train.steps={steps}", "train.prompts_per_step=8", "learner.micro_batch_size=4", "learner.lr=3e-3",
            "learner.max_grad_norm=1.0", "learner.gradient_checkpointing=false", f"tracking.output_dir={out}",
            "tracking.run_name=sft", "sft.max_length=64"]


def test_examples_are_the_recipe_prompt_then_the_solution(tiny_model, data_file, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = load_config(None, _overrides(tiny_model, data_file, tmp_path) + ["data.shuffle=false"])
    examples = sft_examples(cfg, tok)
    assert len(examples) == len(ROWS)
    first = examples[0]
    prompt = tok("1+1=", add_special_tokens=False)["input_ids"]
    target = tok("1+1 is 2.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert first["input_ids"] == prompt + target
    assert first["completion_mask"] == [0] * len(prompt) + [1] * len(target)


def _solution_nll(model_dir: str, examples: list[dict]) -> float:
    """Mean negative log-likelihood of the solution tokens, written out plainly (no TRL)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            targets = ids[0, 1:]
            mask = torch.tensor(ex["completion_mask"][1:], dtype=torch.bool)
            total -= logp[torch.arange(len(targets)), targets][mask].sum().item()
            count += int(mask.sum())
    return total / count


def test_sft_trains_a_tiny_model_offline_and_lowers_its_loss(tiny_model, data_file, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "runs"
    assert main(_overrides(tiny_model, data_file, out)) == 0
    run = out / "sft"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert all(math.isfinite(x["loss"]) for x in lines)
    assert lines[-1]["loss"] < 0.6 * lines[0]["loss"]
    # The saved model, scored independently, fits the solutions better than the initial one.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    examples = sft_examples(load_config(None, _overrides(tiny_model, data_file, out)), tok)
    assert _solution_nll(str(run / "final"), examples) < 0.6 * _solution_nll(tiny_model, examples)
    assert load_config(str(run / "config.yaml")).train.steps == 12


def test_batch_must_be_a_multiple_of_the_micro_batch(tiny_model, data_file, tmp_path, capsys):
    assert main(_overrides(tiny_model, data_file, tmp_path) + ["learner.micro_batch_size=3"]) == 2
    assert "multiple of learner.micro_batch_size" in capsys.readouterr().err


def test_the_rl_launcher_points_sft_recipes_to_rl_sft():
    from rl.algorithms import build_algorithm

    with pytest.raises(KeyError, match="python -m rl.sft recipe=sft_qwen"):
        build_algorithm(load_config("sft_qwen"))
