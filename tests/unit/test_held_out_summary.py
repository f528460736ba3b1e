"""The default run's before/after held-out score: pass@1 with its standard error and the boxed-answer
rate, in the final summary line and on curves.png."""
import json
import math

import pytest

from rl.evaluate import benchmark_metrics
from rl.plot import draw, eval_points, held_out_summary


def _record(correct, completions):
    return {"correct": correct, "completions": completions, "response_tokens": [3] * len(correct),
            "finish_reasons": ["stop"] * len(correct)}


def test_pass_at_1_standard_error_and_boxed_rate_against_hand_computed_values():
    records = [_record([True], ["so \\boxed{4}"]), _record([False], ["5"]), _record([False], ["\\boxed{}"]),
               _record([True], ["\\boxed{7} done"])]
    m = benchmark_metrics(records)
    assert m["pass@1"] == 0.5
    # Per-problem means 1, 0, 0, 1: sample sd = sqrt(4 * 0.25 / 3), divided by sqrt(4).
    assert m["pass@1_se"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert m["boxed_rate"] == 0.5  # an empty box is no answer


def test_summary_and_curves_show_before_and_after(tmp_path):
    lines = [
        {"step": 0, "cumulative_rollout_tokens": 0, "eval/gsm8k/pass@1": 0.05, "eval/gsm8k/pass@1_se": 0.02,
         "eval/gsm8k/boxed_rate": 0.3},
        {"step": 1, "cumulative_rollout_tokens": 100, "reward": 0.1},
        {"step": 2, "cumulative_rollout_tokens": 200, "reward": 0.2, "eval/gsm8k/pass@1": 0.08,
         "eval/gsm8k/pass@1_se": 0.03, "eval/gsm8k/boxed_rate": 0.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert held_out_summary(tmp_path) == ("held-out gsm8k pass@1 0.050 ± 0.020 before -> 0.080 ± 0.030 after step 2 "
                                          "(boxed answers 0.30 -> 0.50)")
    assert eval_points(tmp_path) == {"eval/gsm8k/pass@1": [(0, 0, 0.05, 0.02), (2, 200, 0.08, 0.03)]}
    assert eval_points(tmp_path, "boxed_rate") == {"eval/gsm8k/boxed_rate": [(0, 0, 0.3, 0.0), (2, 200, 0.5, 0.0)]}
    from matplotlib.image import imread

    # Three rows of panels, 2.4 inches each at 90 dpi: reward, held-out pass@1, held-out boxed answers.
    assert imread(draw(tmp_path)).shape[0] == round(3 * 2.4 * 90)
    # Without an evaluation before the first step there is no before/after to report.
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[1:]))
    assert held_out_summary(tmp_path) is None
