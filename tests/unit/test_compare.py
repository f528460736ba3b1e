"""Run comparison: tokens to a target accuracy and ratios on hand-built curves, seed bands, plots."""
from __future__ import annotations

import json

import pytest
import yaml

from rl.compare import compare, first_crossing, load_run, main

METRIC = "eval/gsm8k/pass@1"


def write_run(root, name, algorithm, seed, evals, eval_time=0.0, eval_section=None):
    """A run directory whose metrics.jsonl has a training line between evaluations (as the trainer
    writes them). evals: (step, cumulative tokens, wall time, accuracy)."""
    run = root / name
    run.mkdir()
    config = {"algorithm": algorithm, "seed": seed, "recipe": name, **({"eval": eval_section} if eval_section else {})}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step, tokens, wall, acc in evals:
        lines.append({"step": step, "wall_time": wall - 1, "cumulative_rollout_tokens": tokens, "reward": 0.5})
        lines.append({"step": step, "wall_time": wall, "cumulative_rollout_tokens": tokens, METRIC: acc,
                      "eval/time_s": eval_time})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


@pytest.fixture
def pair(tmp_path):
    # grpo reaches 0.6, opsd only 0.4, with half the tokens per step.
    grpo = write_run(tmp_path, "grpo-s0", "grpo", 0,
                     [(0, 0, 10, 0.1), (1, 200, 30, 0.2), (2, 400, 50, 0.35), (3, 600, 70, 0.4)], eval_time=5)
    opsd = write_run(tmp_path, "opsd-s0", "opsd", 0,
                     [(0, 0, 10, 0.1), (1, 100, 30, 0.3), (2, 200, 50, 0.5), (3, 300, 70, 0.6)], eval_time=5)
    return grpo, opsd


def test_first_crossing_interpolates_between_evaluations():
    xs, ys = [0, 100, 200], [0.1, 0.3, 0.5]
    assert first_crossing(xs, ys, 0.4) == pytest.approx(150)
    assert first_crossing(xs, ys, 0.3) == 100
    assert first_crossing(xs, ys, 0.05) == 0
    assert first_crossing(xs, ys, 0.51) is None
    # The first crossing counts, not a later one after a dip.
    assert first_crossing([0, 10, 20, 30], [0.1, 0.5, 0.2, 0.6], 0.4) == pytest.approx(7.5)


def test_tokens_to_default_target_on_a_hand_built_pair(pair, tmp_path):
    out = tmp_path / "cmp"
    assert main(["runs=" + ",".join(map(str, pair)), f"out={out}"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    # Default target: opsd's best is 0.6, grpo's 0.4, so the target is 0.4 (grpo's best).
    assert result["target"] == pytest.approx(0.4)
    grpo, opsd = result["methods"]["grpo"], result["methods"]["opsd"]
    # opsd passes 0.4 between (100, 0.3) and (200, 0.5): 150 tokens, step 1.5; grpo at its last point.
    assert opsd["tokens_to_target"] == pytest.approx(150)
    assert opsd["step_to_target"] == pytest.approx(1.5)
    assert grpo["tokens_to_target"] == pytest.approx(600)
    assert result["best_method"] == "opsd"
    assert opsd["token_ratio"] == pytest.approx(1.0) and grpo["token_ratio"] == pytest.approx(4.0)
    # Wall time excludes evaluation: 5 s per evaluation, so opsd's points sit at 5, 20, 35, 50 s.
    assert opsd["wall_time_to_target"] == pytest.approx(27.5)
    assert (opsd["best"], opsd["final"]) == (pytest.approx(0.6), pytest.approx(0.6))

    table = (out / "comparison.md").read_text()
    assert "| opsd | 0 | 0.6000 | 0.6000 | 150 | 1.00 | 1.5 | 28 |" in table
    assert "| grpo | 0 | 0.4000 | 0.4000 | 600 | 4.00 | 3.0 |" in table
    for axis in ("tokens", "step", "wall_time"):
        png = out / f"accuracy_vs_{axis}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_given_target_and_a_method_that_never_reaches_it(pair):
    runs = [load_run(p, METRIC) for p in pair]
    at_03 = compare(runs, METRIC, target=0.3)["methods"]
    # grpo: between (200, 0.2) and (400, 0.35): 200 + 0.1 / 0.15 * 200.
    assert at_03["grpo"]["tokens_to_target"] == pytest.approx(200 + 200 * 0.1 / 0.15)
    assert at_03["opsd"]["tokens_to_target"] == pytest.approx(100)
    assert at_03["grpo"]["token_ratio"] == pytest.approx((200 + 200 * 0.1 / 0.15) / 100)
    at_05 = compare(runs, METRIC, target=0.5)["methods"]
    assert at_05["grpo"]["tokens_to_target"] is None and at_05["grpo"]["token_ratio"] is None


def test_a_target_every_method_starts_at_is_flagged(tmp_path):
    # The default target is the weaker method's best, which here is its starting point.
    up = write_run(tmp_path, "up", "igpo", 0, [(0, 0, 10, 0.44), (1, 100, 20, 0.5)])
    down = write_run(tmp_path, "down", "diffu_grpo", 0, [(0, 0, 10, 0.44), (1, 90, 20, 0.4)])
    runs = [load_run(up, METRIC), load_run(down, METRIC)]
    flagged = compare(runs, METRIC)
    assert flagged["target"] == pytest.approx(0.44) and "Pass target=" in flagged["warning"]
    assert compare(runs, METRIC, target=0.46)["warning"] is None
    assert compare(runs, METRIC, target=0.46)["methods"]["igpo"]["tokens_to_target"] == pytest.approx(100 * 0.02 / 0.06)


def test_seeds_become_a_mean_curve_with_a_min_max_band(tmp_path):
    # Seed 1 is evaluated every second step only, and spends fewer tokens per step.
    runs = [
        write_run(tmp_path, "a0", "grpo", 0, [(0, 0, 10, 0.1), (1, 200, 20, 0.3), (2, 400, 30, 0.5)]),
        write_run(tmp_path, "a1", "grpo", 1, [(0, 0, 10, 0.1), (2, 300, 50, 0.6)]),
        write_run(tmp_path, "b0", "opsd", 0, [(0, 0, 10, 0.1), (1, 100, 20, 0.3)]),
    ]
    result = compare([load_run(r, METRIC) for r in runs], METRIC)
    curve = result["methods"]["grpo"]["curve"]
    # Seed 1 interpolated at step 1: 150 tokens, 30 s, 0.35.
    assert curve["step"] == [0, 1, 2]
    assert curve["tokens"] == pytest.approx([0, 175, 350])
    assert curve["wall_time"] == pytest.approx([10, 25, 40])
    assert curve["mean"] == pytest.approx([0.1, 0.325, 0.55])
    assert curve["min"] == pytest.approx([0.1, 0.3, 0.5])
    assert curve["max"] == pytest.approx([0.1, 0.35, 0.6])
    assert result["methods"]["grpo"]["seeds"] == [0, 1]
    # Target 0.3 (opsd's best): the mean curve crosses it between (0, 0.1) and (175, 0.325).
    assert result["target"] == pytest.approx(0.3)
    grpo = result["methods"]["grpo"]
    assert grpo["tokens_to_target"] == pytest.approx(175 * 0.2 / 0.225)
    assert grpo["step_to_target"] == pytest.approx(0.2 / 0.225)
    assert grpo["per_run_tokens_to_target"] == pytest.approx([200, 300 * 0.2 / 0.5])
    assert grpo["token_ratio"] == pytest.approx(175 * 0.2 / 0.225 / 100)


def test_same_method_and_seed_twice_needs_labels(tmp_path, capsys):
    a = write_run(tmp_path, "lr1", "grpo", 0, [(0, 0, 1, 0.1), (1, 100, 2, 0.3)])
    b = write_run(tmp_path, "lr2", "grpo", 0, [(0, 0, 1, 0.1), (1, 100, 2, 0.4)])
    assert main([f"runs={a},{b}", f"out={tmp_path / 'x'}"]) == 2
    assert "labels=NAME,NAME" in capsys.readouterr().err
    assert main([f"runs={a},{b}", "labels=lr1,lr2", f"out={tmp_path / 'y'}"]) == 0
    result = json.loads((tmp_path / "y" / "comparison.json").read_text())
    assert sorted(result["methods"]) == ["lr1", "lr2"]


def test_missing_metric_names_the_logged_keys(pair, capsys):
    assert main([f"runs={pair[0]}", "metric=eval/math500/pass@1"]) == 2
    assert "eval/gsm8k/pass@1" in capsys.readouterr().err


def test_runs_evaluated_under_different_protocols_are_refused_or_flagged(tmp_path, capsys):
    evals = [(0, 0, 10, 0.1), (1, 100, 30, 0.3)]
    paper = {"protocol": "opsd_paper"}
    grpo = write_run(tmp_path, "grpo", "grpo", 0, evals, eval_section=paper)
    opsd_same = write_run(tmp_path, "opsd", "opsd", 0, evals, eval_section={**paper, "temperature": 1.0})
    opsd_short = write_run(tmp_path, "opsd-short", "opsd", 1, evals, eval_section={**paper, "max_tokens": 1024})
    # One protocol (an explicit value equal to the protocol's changes nothing): compared.
    result = compare([load_run(grpo, METRIC), load_run(opsd_same, METRIC)], METRIC)
    assert result["protocol_warning"] is None and result["protocol"]["max_tokens"] == 38912
    # Mixed: refused with the differing setting named, on the command line too.
    with pytest.raises(Exception, match="different protocols.*max_tokens.*38912.*1024"):
        compare([load_run(grpo, METRIC), load_run(opsd_short, METRIC)], METRIC)
    assert main([f"runs={grpo},{opsd_short}", f"out={tmp_path / 'refused'}"]) == 2
    assert "max_tokens" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    # Or compared with a loud flag in every output.
    out = tmp_path / "flagged"
    assert main([f"runs={grpo},{opsd_short}", "--allow-mixed-protocols", f"out={out}"]) == 0
    assert "MIXED EVALUATION PROTOCOLS: max_tokens" in capsys.readouterr().err
    assert "not comparable as evaluated" in (out / "comparison.md").read_text()
    assert "max_tokens" in json.loads((out / "comparison.json").read_text())["protocol_warning"]


def test_bad_command_lines_are_named(pair, tmp_path, capsys):
    """rl.compare takes key=value options like every tool (rl.cli); anything else is named."""
    assert main([str(pair[0]), str(pair[1])]) == 2  # the old positional style
    assert f"Argument `{pair[0]}` is not of the form key=value" in capsys.readouterr().err
    assert main([f"runs={pair[0]}", "--metric", "eval/gsm8k/pass@1"]) == 2  # the old flag style
    assert "Unknown switch `--metric`: its switches are --allow-mixed-protocols" in capsys.readouterr().err
    assert main(["metric=eval/gsm8k/pass@1"]) == 2
    assert "Missing `runs=...`" in capsys.readouterr().err
    assert main([f"runs={pair[0]}", "target=high", f"out={tmp_path}"]) == 2
    assert "target=high is not a number" in capsys.readouterr().err
    assert main([f"runs={pair[0]}", "taget=0.4"]) == 2
    assert "Unknown option `taget`. Options: runs, metric, target, labels, out." in capsys.readouterr().err


def test_final_and_best_checkpoint_per_benchmark(tmp_path):
    """The OPSD paper's best-checkpoint figure, beside the final one, labelled, with its step."""
    a = write_run(tmp_path, "opsd-s0", "opsd", 0, [(0, 0, 10, 0.1), (1, 100, 20, 0.5), (2, 200, 30, 0.3)])
    b = write_run(tmp_path, "opsd-s1", "opsd", 1, [(0, 0, 10, 0.1), (1, 100, 20, 0.2), (2, 200, 30, 0.4)])
    # A second benchmark, logged by one seed only, is left out of the method's row.
    with (a / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "wall_time": 31, "cumulative_rollout_tokens": 200, "eval/aime24/pass@1": 0.2}) + "\n")
    out = tmp_path / "cmp"
    assert main([f"runs={a},{b}", f"out={out}", f"metric={METRIC}"]) == 0
    row = json.loads((out / "comparison.json").read_text())["checkpoints"]["opsd"]
    assert list(row) == ["gsm8k"]
    assert row["gsm8k"]["final"] == pytest.approx((0.3 + 0.4) / 2)
    assert row["gsm8k"]["best_checkpoint"] == pytest.approx((0.5 + 0.4) / 2)
    assert row["gsm8k"]["best_steps"] == [1, 2] and row["gsm8k"]["final_steps"] == [2, 2]
    report = (out / "comparison.md").read_text()
    assert "best checkpoint" in report.lower() and "optimistic" in report


def test_evaluate_reports_a_runs_final_and_best_checkpoint(tmp_path, capsys):
    from rl.evaluate import report_checkpoints

    run = write_run(tmp_path, "grpo-s0", "grpo", 0, [(0, 0, 10, 0.1), (5, 100, 20, 0.45), (10, 200, 30, 0.3)])
    report_checkpoints(run)
    line = capsys.readouterr().err
    assert "final (step 10) pass@1 0.3000" in line and "best checkpoint (step 5" in line and "0.4500" in line
