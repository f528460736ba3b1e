"""Benchmark evaluation: the pass@k estimator, metric aggregation, deterministic re-grading of saved
generations, clear offline errors, and one real vLLM evaluation of a tiny model from the command line."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import pytest

from rl.config import ConfigError, EvalConfig, load_config
from rl.core.paths import PROJECT_ROOT
from rl.evaluate import (
    Evaluator, eval_due, main, pass_at_k, pass_ks, read_records, regrade, resolve_run, sampling_temperature,
)
from rl.core.types import Completion

SHARED = str(PROJECT_ROOT.parent / "shared" / "data")

# Problem -> the k=4 completions a scripted engine returns, with the correctness a person grading
# by hand gives them (answer_fallback=last_number: an unboxed final number counts).
SCRIPT = {
    "gsm8k": [
        ("Tom has 18 apples. How many?", "18", [("\\boxed{18}", 1), ("\\boxed{17}", 0), ("The answer is 18", 1), ("#### 18", 1)]),
        ("What is 6 times 7?", "42", [("\\boxed{41}", 0), ("I do not know", 0), ("\\boxed{24}", 0), ("43", 0)]),
        ("How many legs do 3 cats have?", "12", [("\\boxed{12}", 1), ("\\boxed{9}", 0), ("\\boxed{3}", 0), ("\\boxed{}", 0)]),
    ],
    "math500": [
        ("Compute $\\sin^2 x + \\cos^2 x - \\frac12$.", "\\frac{1}{2}",
         [("\\boxed{\\frac12}", 1), ("\\boxed{0.5}", 1), ("\\boxed{1/2}", 1), ("\\boxed{2}", 0)]),
        ("Convert $(0,3)$ to polar coordinates.", "\\left( 3, \\frac{\\pi}{2} \\right)",
         [("\\boxed{(3,\\frac{\\pi}{2})}", 1), ("\\boxed{(3, \\pi)}", 0), ("\\boxed{(3,\\frac{\\pi}{2})}", 1), ("\\boxed{(3,\\frac{\\pi}{2})}", 1)]),
    ],
}


def brute_force_pass_at_k(correct: list[int], k: int) -> float:
    """The fraction of all k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = brute_force_pass_at_k([1] * c + [0] * (n - c), k)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)


def test_pass_at_k_is_exact_where_binomials_overflow_floats():
    # C(1000, 300) has ~260 digits; the exact rational is the reference.
    for n, c, k in [(1000, 3, 300), (1000, 1, 1), (2000, 50, 64)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError, match=r"1 <= k <= n, got n=4, c=1, k=5"):
        pass_at_k(4, 1, 5)


def test_reported_pass_at_j():
    assert pass_ks(1) == [1]
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]


def test_sampling_temperature_defaults():
    assert sampling_temperature(EvalConfig()) == 0.0  # k=1: greedy
    assert sampling_temperature(EvalConfig(k=4)) == 0.6
    assert sampling_temperature(EvalConfig(k=4, temperature=1.0)) == 1.0
    with pytest.raises(ConfigError, match="temperature"):
        load_config(None, ["eval.k=4", "eval.temperature=0"])


def test_eval_due():
    cfg = EvalConfig(every_steps=4, at_start=True)
    assert [s for s in range(0, 11) if eval_due(cfg, s, total_steps=10)] == [0, 4, 8, 10]
    off = EvalConfig()
    assert not any(eval_due(off, s, total_steps=10) for s in range(0, 11))


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture
def scripted_dir(tmp_path):
    """A local_dir with the scripted problems as gsm8k and math500 test sets."""
    for bench, problems in SCRIPT.items():
        (tmp_path / bench).mkdir()
        rows = [{"problem": q, "answer": a} for q, a, _ in problems]
        (tmp_path / bench / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


class ScriptedEngine:
    """Answers each prompt (plain format: the problem text) with its scripted completions; the
    last sample of every problem is cut at max_tokens."""

    def __init__(self, tokenizer):
        self.tokenizer, self.specs = tokenizer, []
        self.by_problem = {q: [t for t, _ in samples] for problems in SCRIPT.values() for q, _, samples in problems}

    def generate(self, prompts, spec):
        self.specs.append(spec)
        out = []
        for p in prompts:
            texts = self.by_problem[self.tokenizer.decode(p)][: spec.n]
            out.append([
                Completion(p, list(range(len(t))), t, [0.0] * len(t), "length" if j == len(texts) - 1 else "stop")
                for j, t in enumerate(texts)
            ])
        return out


def _evaluator(tokenizer, local_dir, **eval_kwargs) -> Evaluator:
    cfg = EvalConfig(benchmarks=["gsm8k", "math500"], local_dir=str(local_dir), prompt_format="plain", **eval_kwargs)
    return Evaluator(tokenizer, cfg)


def test_metrics_of_a_scripted_engine_match_hand_computation(tokenizer, scripted_dir, tmp_path):
    engine = ScriptedEngine(tokenizer)
    metrics = _evaluator(tokenizer, scripted_dir, k=4, batch_size=2).run(engine, tmp_path / "out")

    # gsm8k: 3, 0 and 1 of 4 samples right. pass@2 = 1 - C(4-c, 2)/C(4, 2): 1, 0, 1/2.
    assert metrics["eval/gsm8k/pass@1"] == pytest.approx((3 / 4 + 0 + 1 / 4) / 3)
    assert metrics["eval/gsm8k/avg@4"] == pytest.approx((3 / 4 + 0 + 1 / 4) / 3)
    assert metrics["eval/gsm8k/pass@2"] == pytest.approx((1 + 0 + 1 / 2) / 3)
    assert metrics["eval/gsm8k/pass@4"] == pytest.approx(2 / 3)
    # math500: 3 and 3 of 4 (\frac12, 0.5 and 1/2 all equal the gold 1/2).
    assert metrics["eval/math500/pass@1"] == pytest.approx(3 / 4)
    assert metrics["eval/math500/pass@2"] == pytest.approx(1.0)
    lengths = [len(t) for _, _, samples in SCRIPT["gsm8k"] for t, _ in samples]
    assert metrics["eval/gsm8k/response_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["eval/gsm8k/truncated_fraction"] == pytest.approx(1 / 4)
    assert metrics["eval/gsm8k/problems"] == 3 and metrics["eval/math500/problems"] == 2
    assert metrics["eval/time_s"] > 0
    # The default sampling for k > 1, and batches of 2 problems: 2 + 1 (gsm8k) + 2 (math500).
    assert [(s.n, s.temperature, s.top_p) for s in engine.specs] == [(4, 0.6, 0.95)] * 3

    records = read_records(tmp_path / "out" / "gsm8k.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["correct"] for r in records] == [[bool(c) for _, c in samples] for _, _, samples in SCRIPT["gsm8k"]]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["metrics"] == metrics and summary["settings"]["temperature"] == 0.6
    assert summary["protocol"] == EvalConfig(prompt_format="plain", k=4).protocol_settings()


def test_greedy_single_sample_and_fixed_subset(tokenizer, scripted_dir, tmp_path):
    engine = ScriptedEngine(tokenizer)
    metrics = _evaluator(tokenizer, scripted_dir, limit=2, save_records=False).run(engine, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["summary.json"]
    assert [(s.n, s.temperature) for s in engine.specs] == [(1, 0.0), (1, 0.0)]
    # The first sample of the first two gsm8k problems: right, wrong.
    assert metrics["eval/gsm8k/pass@1"] == 0.5 and metrics["eval/gsm8k/problems"] == 2
    assert "eval/gsm8k/pass@2" not in metrics and metrics["eval/gsm8k/avg@1"] == 0.5


def test_regrading_saved_generations_is_deterministic(tokenizer, scripted_dir, tmp_path):
    out = tmp_path / "out"
    metrics = _evaluator(tokenizer, scripted_dir, k=4).run(ScriptedEngine(tokenizer), out)
    metrics.pop("eval/time_s")
    again = [regrade(out) for _ in range(3)]
    assert all(m == metrics for m in again)
    assert regrade(out / "math500.jsonl") == {k: v for k, v in metrics.items() if k.startswith("eval/math500/")}
    # Regrading really grades: without the last-number fallback "The answer is 18" and "43"
    # lose their credit (only the first changes a score).
    strict = regrade(out, answer_fallback="none")
    assert strict["eval/gsm8k/pass@1"] == pytest.approx((2 / 4 + 0 + 1 / 4) / 3)
    assert strict["eval/math500/pass@1"] == metrics["eval/math500/pass@1"]


def test_prompt_longer_than_the_engines_context_is_refused_up_front(tokenizer, scripted_dir):
    from rl.data import DataError

    cfg = EvalConfig(benchmarks=["gsm8k"], local_dir=str(scripted_dir), prompt_format="plain", max_prompt_tokens=5)
    with pytest.raises(DataError, match="eval.max_prompt_tokens"):
        Evaluator(tokenizer, cfg)


def test_a_run_directory_brings_its_final_model_and_prompt_format(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "config.yaml").write_text(load_config(None, ["eval.prompt_format=plain", "eval.max_tokens=77", "seed=3"]).to_yaml())
    cfg, model, out = resolve_run({"model": str(run), "k": "4", "benchmarks": "gsm8k,aime24"})
    assert model == str(run / "final") and out == run / "eval" / "final"
    assert (cfg.eval.prompt_format, cfg.eval.max_tokens, cfg.seed, cfg.eval.k, cfg.eval.benchmarks) == ("plain", 77, 3, 4, ["gsm8k", "aime24"])
    # A protocol named on the command line replaces the run's, key by key; keys given win.
    cfg, _, _ = resolve_run({"model": str(run), "protocol": "opsd_paper", "k": "4"})
    assert (cfg.eval.max_tokens, cfg.eval.enable_thinking, cfg.eval.prompt_format, cfg.eval.k) == (38912, True, "chat", 4)
    # A recipe, when named, decides the protocol instead.
    cfg, _, _ = resolve_run({"model": str(run), "recipe": "grpo_smollm2", "out": str(tmp_path / "o")})
    assert cfg.eval.prompt_format == load_config("grpo_smollm2").eval.prompt_format == "chat"


# Training-side settings that differ between recipes by design; none may reach the evaluation.
TRAINING_ONLY = ["data.prompt_format=plain", "data.enable_thinking=false", "data.instruction=Answer tersely.",
                 "data.system_prompt=You are a student.", "data.max_prompt_tokens=64", "rollout.max_tokens=32",
                 "rollout.temperature=1.3", "rollout.top_p=0.5", "rollout.top_k=3", "algorithm=opsd"]


def test_evaluation_prompt_and_length_do_not_change_with_the_training_recipe(tokenizer, scripted_dir):
    base = ["eval.benchmarks=[gsm8k,math500]", f"eval.local_dir={scripted_dir}", "eval.k=2"]
    evaluators = [Evaluator(tokenizer, load_config(None, base + extra).eval) for extra in ([], TRAINING_ONLY)]
    assert evaluators[0].prompts == evaluators[1].prompts
    assert evaluators[0].spec == evaluators[1].spec
    assert evaluators[0].context_tokens() == evaluators[1].context_tokens()
    # The prompt really is the eval protocol's: the chat template around the eval template, and a
    # change of the eval section does change it.
    problem = SCRIPT["gsm8k"][0][0]
    want = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."}],
        add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert evaluators[0].prompts["gsm8k"][0] == want
    assert evaluators[0].spec.max_tokens == 1024
    plain = Evaluator(tokenizer, load_config(None, base + ["eval.prompt_format=plain"]).eval)
    assert plain.prompts["gsm8k"][0] == tokenizer(problem, add_special_tokens=False)["input_ids"]


def test_the_qwen_recipes_share_the_opsd_paper_protocol():
    protocols = {name: load_config(name).eval.protocol_settings() for name in ("grpo_qwen", "opsd_qwen", "sft_qwen")}
    assert protocols["grpo_qwen"] == protocols["opsd_qwen"] == protocols["sft_qwen"]
    p = protocols["grpo_qwen"]
    assert (p["prompt_format"], p["enable_thinking"], p["max_tokens"], p["temperature"], p["k"]) == ("chat", True, 38912, 1.0, 12)
    # while their training settings differ (student thinking off at 1024 tokens, GRPO on at 16k).
    opsd, grpo = load_config("opsd_qwen"), load_config("grpo_qwen")
    assert (opsd.data.enable_thinking, opsd.rollout.max_tokens) == (False, 1024)
    assert grpo.rollout.max_tokens != opsd.rollout.max_tokens
    # A key set next to the protocol wins, and the recorded protocol then differs.
    changed = load_config("opsd_qwen", ["eval.max_tokens=1024"]).eval.protocol_settings()
    assert changed["max_tokens"] == 1024 and changed != p
    with pytest.raises(ConfigError, match="unknown eval.protocol"):
        load_config(None, ["eval.protocol=opsd_papr"])


def test_command_line_rejects_unknown_options(capsys):
    assert main(["modle=x"]) == 2
    assert "Unknown option `modle`" in capsys.readouterr().err


def _cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "rl.evaluate", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def test_hub_name_offline_error_is_one_clear_paragraph(tiny_model):
    proc = _cli(f"model={tiny_model}", "benchmarks=aime24", env={"HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "HuggingFaceH4/aime_2024" in proc.stderr and "local_dir=../shared/data" in proc.stderr


@pytest.mark.slow
def test_real_evaluation_of_a_tiny_model_with_vllm(tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = _cli(f"model={tiny_model}", "benchmarks=gsm8k,amc23", f"local_dir={SHARED}", "limit=3", "k=2",
                "temperature=1.0", "max_tokens=12", "batch_size=2", "prompt_format=plain",
                "rollout.kv_cache_gb=0.25", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "[eval] amc23 3/3 | all 6/6 problems" in proc.stderr and "problems/s | ETA" in proc.stderr

    for bench in ("gsm8k", "amc23"):
        records = read_records(out / f"{bench}.jsonl")
        assert [r["index"] for r in records] == [0, 1, 2]
        assert all(len(r["completions"]) == len(r["correct"]) == 2 for r in records)
        assert all(1 <= t <= 12 for r in records for t in r["response_tokens"])
        mean_correct = sum(sum(r["correct"]) for r in records) / 6
        assert metrics[f"eval/{bench}/pass@1"] == pytest.approx(mean_correct)
    assert json.loads((out / "summary.json").read_text())["metrics"] == metrics
    metrics.pop("eval/time_s")
    assert regrade(out) == metrics
