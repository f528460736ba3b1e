"""The OPSD paper's benchmarks (AIME24, AIME25, HMMT25) and its evaluation's grading.

The AIME25 and HMMT25 loaders read hub-shaped rows (`problem`, an integer or LaTeX `answer`,
`problem_idx`) from `local_dir`; the fixtures here are made-up problems in that shape. Grading is the
release's: the last `\\boxed{}` of the whole output, no box means wrong (siyan-zhao/OPSD
eval/evaluate_math.py:15-86 at 7448751)."""
from pathlib import Path

import pytest

from rl.config import EvalConfig, load_config
from rl.data import HUB_NAMES
from rl.evaluate import HUB_SPLITS, load_benchmark
from rewards.math import boxed_after_think_correct_reward, last_boxed_correct_reward

FIXTURES = str(Path(__file__).resolve().parents[1] / "fixtures" / "benchmarks")


@pytest.mark.parametrize("name, hub, first_answer, rows", [
    ("aime25", "yentinglin/aime_2025", "25", 3),
    ("hmmt25", "MathArena/hmmt_feb_2025", "\\frac{5}{6}", 2),
])
def test_loaders_read_local_copies_and_name_the_hub_sets(name, hub, first_answer, rows):
    loaded = load_benchmark(name, FIXTURES, None)
    assert len(loaded) == rows and loaded[0]["answer"] == first_answer and loaded[0]["problem"].startswith(("Find", "Compute"))
    assert HUB_NAMES[name] == (hub, None) and HUB_SPLITS[name] == "train"
    assert len(load_benchmark(name, FIXTURES, 1)) == 1
    assert name in EvalConfig(benchmarks=[name]).benchmarks


def test_the_opsd_recipes_evaluate_on_the_papers_three_benchmarks():
    for recipe in ("opsd_qwen", "grpo_qwen", "sft_qwen"):
        assert load_config(recipe).eval.benchmarks == ["aime24", "aime25", "hmmt25"]


@pytest.mark.parametrize("text, correct", [
    ("so the answer is \\boxed{24}", True),
    ("<think>maybe \\boxed{24}</think> no: \\boxed{25}", False),  # the last box counts, thinking included
    ("first \\boxed{25} then \\boxed{24}", True),
    ("The answer is 24.", False),  # no box: wrong, no last-number fallback
    ("#### 24", False),
    ("\\boxed{24} and then \\boxed 7", False),  # the last \boxed must open with a brace
    ("\\boxed{\\frac{48}{2}}", True),  # math-verify equivalence
])
def test_release_evaluation_grading(text, correct):
    assert last_boxed_correct_reward(text, "24") == float(correct)


@pytest.mark.parametrize("text, correct", [
    ("<think>\\boxed{3}</think>The answer: \\boxed{24}, not \\boxed{3}", True),  # first box after </think>
    ("<think>\\boxed{24}</think>so \\boxed{3}", False),
    ("no think block, \\boxed{24} then \\boxed{3}", True),
    ("\\boxed{ 2 4 }", True),  # the release's whitespace-free string fallback
    ("24", False),
])
def test_release_grpo_reward(text, correct):
    assert boxed_after_think_correct_reward(text, "24") == float(correct)
