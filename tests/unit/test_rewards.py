"""Reward registry, built-in rewards, inline scoring, real-data checks and the check command."""
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import rewards
from rewards.calls import Signature
from rewards.math import answers_match, boxed_format_reward, math_verify_reward, overlong_reward
from rewards.registry import portable_ref
from rewards.scoring import RewardError, RewardScorer, log_failures
from rl.config import RewardConfig
from rl.core.paths import PROJECT_ROOT

DATA = PROJECT_ROOT.parent / "shared" / "data"
FIXTURE = "tests/fixtures/custom_reward.py"


@rewards.register_reward("test_exact_match")
def exact_match(completion: str, answer: str, **row) -> float:
    return float(completion.strip() == answer)


# ----------------------------------------------------------------------------- registry


def test_get_reward_resolves_names_modules_and_files():
    assert rewards.get_reward("math_verify") is math_verify_reward
    assert rewards.get_reward("rewards.math:boxed_format_reward") is boxed_format_reward
    fn = rewards.get_reward(f"{FIXTURE}:short_and_right")
    assert fn("so \\boxed{4}", answer="4", question="2+2?") == {"correct": 1.0, "brevity": 0.1}
    assert rewards.get_reward("test_exact_match")("7 ", answer="7") == 1.0
    assert {"math_verify", "boxed_format", "overlong", "test_exact_match"} <= set(rewards.registered_rewards())


def test_bad_references_say_what_is_wrong():
    with pytest.raises(KeyError, match="Registered rewards: .*math_verify"):
        rewards.get_reward("math_verfy")
    with pytest.raises(ImportError, match="does not exist"):
        rewards.get_reward("no_such_file.py:f")
    with pytest.raises(ImportError, match="No module named"):
        rewards.get_reward("no_such_module:f")
    with pytest.raises(AttributeError, match="no function 'missing'"):
        rewards.get_reward(f"{FIXTURE}:missing")


def test_register_refuses_a_second_function_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("math_verify")(lambda completion, **row: 0.0)
    # Re-importing the same definition (a worker, or a file loaded twice) is not a clash.
    rewards.register_reward("test_exact_match")(exact_match)


def test_portable_ref_works_from_another_directory():
    assert portable_ref("math_verify") == "math_verify"
    assert portable_ref("test_exact_match") == f"{__name__}:exact_match"
    file_ref = portable_ref(f"{FIXTURE}:nan_on_flag")
    assert Path(file_ref.rsplit(":", 1)[0]).is_absolute() and file_ref.endswith(".py:nan_on_flag")


# ----------------------------------------------------------------------------- built-in rewards


def test_boxed_format_and_overlong():
    assert boxed_format_reward("so \\boxed{12}") == 1.0
    assert boxed_format_reward("so \\boxed{ }") == 0.0 and boxed_format_reward("12") == 0.0
    # max 100, buffer 20: free up to 80 tokens, then linear to -1 at 100.
    values = [overlong_reward("", completion_tokens=t, max_tokens=100) for t in (10, 80, 90, 95, 100, 130)]
    assert values == pytest.approx([0.0, 0.0, -0.5, -0.75, -1.0, -1.0])
    hard = [overlong_reward("", completion_tokens=t, max_tokens=100, overlong_buffer_frac=0.0) for t in (99, 100)]
    assert hard == [0.0, -1.0]  # no buffer: only truncation is penalised


def test_math_verify_runs_outside_the_main_thread():
    # Its default signal.alarm timeouts raise ValueError off the main thread.
    with ThreadPoolExecutor(2) as ex:
        got = list(ex.map(lambda p: answers_match(*p), [("\\frac{1}{2}", "0.5"), ("3", "4")]))
    assert got == [True, False]


def test_signature_passes_context_only_to_functions_that_name_it():
    row = {"answer": "4", "question": "2+2?"}
    context = {"completion_tokens": 3, "max_tokens": 8, "answer_fallback": "none"}
    assert Signature.of(math_verify_reward).kwargs(row, context) == {**row, "answer_fallback": "none"}
    assert Signature.of(overlong_reward).kwargs(row, context) == {**row, "completion_tokens": 3, "max_tokens": 8}
    assert Signature.of(lambda completion, answer: 0).kwargs(row, context) == {"answer": "4"}


# ----------------------------------------------------------------------------- inline scoring


def test_weighted_total_and_dict_parts():
    texts = ["\\boxed{4}", "\\boxed{5}", "four"]
    rows = [{"answer": "4"}] * 3
    with RewardScorer([("math_verify", 2.0), (f"{FIXTURE}:short_and_right", 0.5), ("boxed_format", 0.1)]) as s:
        result = s.score(texts, rows)
    assert result.totals == pytest.approx([2 + 0.5 * 1.1 + 0.1, 0.5 * 0.1 + 0.1, 0.5 * 0.1])
    assert result.parts == {
        "math_verify": [1.0, 0.0, 0.0], "correct": [1.0, 0.0, 0.0], "brevity": [0.1] * 3, "boxed_format": [1.0, 1.0, 0.0]
    }
    assert result.counts == {"reward_timeouts": 0, "reward_errors_scored_zero": 0} and not result.failures


def test_dict_total_key_is_the_total_and_is_logged_under_the_reward():
    scorer = RewardScorer([("rewards.math:math_verify_reward", 1.0)])
    scorer.fns[0] = lambda completion, **row: {"total": 0.25, "a": 1.0, "b": 2.0}
    result = scorer.score(["x"], [{"answer": "1"}])
    assert result.totals == [0.25] and result.parts == {"a": [1.0], "b": [2.0], "math_verify_reward": [0.25]}


def test_context_reaches_rewards_that_name_it():
    cfg = RewardConfig(functions=[{"name": "overlong"}, {"name": "math_verify"}], answer_fallback="none", workers=0)
    scorer = RewardScorer.from_config(cfg, max_tokens=10)
    info = [{"completion_tokens": n, "truncated": n >= 10} for n in (5, 9, 10)]
    result = scorer.score(["72", "72", "\\boxed{72}"], [{"answer": "72"}] * 3, info)
    assert result.parts["overlong"] == pytest.approx([0.0, -0.5, -1.0])
    assert result.parts["math_verify"] == [0.0, 0.0, 1.0]  # fallback "none": unboxed 72 is no answer


@pytest.mark.parametrize("fn,match", [("raise_on_flag", "raised ZeroDivisionError: flagged row"), ("nan_on_flag", "returned nan")])
def test_error_stops_with_function_completion_and_row(fn, match):
    rows = [{"question": "q0", "flag": False}, {"question": "q1", "flag": True}, {"question": "q2", "flag": True}]
    with pytest.raises(RewardError, match=match) as err:
        RewardScorer([(f"{FIXTURE}:{fn}", 1.0)]).score(["aa", "bbb", "cccc"], rows)
    message = str(err.value)
    assert f"{FIXTURE}:{fn}" in message and "completion 1: 'bbb'" in message and "'question': 'q1'" in message
    assert "2 such failure(s)" in message and "reward.on_error=zero" in message


def test_on_error_zero_scores_zero_counts_and_logs(tmp_path):
    rows = [{"question": f"q{i}", "flag": i % 2 == 1, "answer": "1"} for i in range(4)]
    texts = ["\\boxed{1}", "\\boxed{1} b", "\\boxed{2} cc", "\\boxed{1} ddd"]
    scorer = RewardScorer([(f"{FIXTURE}:nan_on_flag", 1.0), ("math_verify", 1.0)], on_error="zero")
    result = scorer.score(texts, rows)
    assert result.totals == [len(texts[0]) + 1.0, 1.0, len(texts[2]), 1.0]
    assert result.counts == {"reward_timeouts": 0, "reward_errors_scored_zero": 2}
    assert [(f.index, f.reward, f.kind, f.row["question"]) for f in result.failures] == [
        (1, f"{FIXTURE}:nan_on_flag", "error", "q1"), (3, f"{FIXTURE}:nan_on_flag", "error", "q3")
    ]
    log_failures(tmp_path / "f.jsonl", 7, result.failures)
    logged = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"], r["completion"]) for r in logged] == [(7, 1, texts[1]), (7, 3, texts[3])]


def test_two_rewards_with_one_part_name_are_refused():
    scorer = RewardScorer([(f"{FIXTURE}:short_and_right", 1.0), ("rewards.math:math_verify_reward", 1.0)])
    scorer.fns[1] = lambda completion, **row: {"correct": 1.0}
    with pytest.raises(RewardError, match="both produce a part named 'correct'"):
        scorer.score(["\\boxed{1}"], [{"answer": "1"}])


# ----------------------------------------------------------------------------- real data


def _read(name):
    return [json.loads(line) for line in (DATA / name / "test.jsonl").read_text().splitlines() if line.strip()]


def _next_different(golds, i):
    j = (i + 1) % len(golds)
    while golds[j].strip() == golds[i].strip():
        j = (j + 1) % len(golds)
    return j


def _score_references(completions, golds):
    """Scores of each reference against its own gold and against the next different gold."""
    partners = [_next_different(golds, i) for i in range(len(golds))]
    with RewardScorer([("math_verify", 1.0)], workers=2, timeout_s=30) as scorer:
        own = scorer.score(completions, [{"answer": g} for g in golds])
        other = scorer.score(completions, [{"answer": golds[j]} for j in partners])
    assert not own.failures and not other.failures
    return own.totals, other.totals, partners


def test_gsm8k_reference_solutions_score_1_and_0_against_another_answer():
    raw = _read("gsm8k")
    golds = [r["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in raw]
    own, other, _ = _score_references([r["answer"] for r in raw], golds)
    assert len(own) == 1319
    assert [i for i, v in enumerate(own) if v != 1.0] == []
    assert [i for i, v in enumerate(other) if v != 0.0] == []


def test_math500_reference_solutions_score_1_and_0_against_another_answer():
    raw = _read("math500")
    own, other, partners = _score_references([r["solution"] for r in raw], [r["answer"] for r in raw])
    assert len(own) == 500
    assert [i for i, v in enumerate(own) if v != 1.0] == []
    # The one exception: row 23's gold is the equation `x=5` and row 22's is `5`; math-verify
    # (rightly) accepts a bare value for a one-variable equation, so these golds are equivalent.
    exceptions = [(i, partners[i]) for i, v in enumerate(other) if v != 0.0]
    assert exceptions == [(22, 23)]
    assert (raw[22]["answer"], raw[23]["answer"]) == ("5", "x=5")


# ----------------------------------------------------------------------------- check command


def _check(*args):
    return subprocess.run(
        [sys.executable, "-m", "rewards.check", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )


def test_check_command_on_math500():
    proc = _check("refs=math_verify", "data=math500", "local_dir=../shared/data", "limit=40", "expect=1,0", "workers=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reference: 40 completions" in proc.stdout and "math_verify: 1: 40" in proc.stdout
    wrong = proc.stdout.split("\nwrong:")[1]
    assert "not at 1: 0" in proc.stdout and "not at 0: 1" in wrong and "gold 'x=5'" in wrong  # rows 22/23


def test_check_command_reports_failures(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"s \\boxed{{{i}}}", "solution": f"s \\boxed{{{i}}}",
                                        "flag": i == 2}) + "\n" for i in range(5)))
    proc = _check(f"refs={FIXTURE}:raise_on_flag", f"data={data}", "workers=0")
    assert proc.returncode == 1
    assert "error in tests/fixtures/custom_reward.py:raise_on_flag on #2" in proc.stdout
    assert "'reward_errors_scored_zero': 1" in proc.stdout


def test_check_command_names_bad_arguments():
    old_style = _check("math_verify", "--data", "gsm8k")
    assert old_style.returncode == 2 and "Argument `math_verify` is not of the form key=value" in old_style.stderr
    no_refs = _check("data=gsm8k")
    assert no_refs.returncode == 2 and "Missing `refs=...`" in no_refs.stderr
    bad_expect = _check("refs=math_verify", "expect=1")
    assert bad_expect.returncode == 2 and "give two numbers" in bad_expect.stderr
