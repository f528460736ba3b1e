"""IGPO's data, prompt, rewards and answer extraction as facebookresearch/igpo's released code has
them (utils/data_utils.py, utils/reward_func.py, train.yaml), on hand-written cases; and GSM8K's
calculator annotations kept out of reference solutions."""
from __future__ import annotations

import json

import pytest

from rl.config import DataConfig, load_config
from rl.data import build_prompt, load_rows, normalize_row, stated_answer
from rewards.math import first_boxed, first_boxed_correct_reward, xmlcount_reward

RELEASE_FORMAT_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n\\boxed{<Your answer>}\n</answer>\n"


def test_metamath_filter_keeps_answer_augmentations_deduplicated_by_query(tmp_path):
    raw = [
        {"type": "GSM_AnsAug", "query": "q1", "response": "1+1=2\nThe answer is: 2"},
        {"type": "GSM_Rephrased", "query": "q2", "response": "The answer is: 3"},
        {"type": "MATH_AnsAug", "query": "q3", "response": "So $x=\\boxed{4}$.\nThe answer is: 4"},
        {"type": "GSM_AnsAug", "query": "q1", "response": "2 apples.\nThe answer is: 2"},  # same query: dropped
        {"type": "MATH_SV", "query": "q4", "response": "The answer is: 5"},
        {"type": "GSM_FOBAR", "query": "q5", "response": "The answer is: 6"},
        {"type": "MATH_AnsAug", "query": "q6", "response": "3*3=9\nThe answer is: 9"},
    ]
    path = tmp_path / "metamath.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in raw))
    recipe = load_config("igpo_llada").data
    cfg = recipe.model_copy(update={"train": str(path), "shuffle": False})
    rows = load_rows(cfg, seed=0)
    assert [(r["problem"], r["answer"]) for r in rows] == [("q1", "2"), ("q3", "4"), ("q6", "9")]
    assert rows[0]["solution"] == raw[0]["response"]  # the first of the duplicates
    assert recipe.type_filter == ["GSM_AnsAug", "MATH_AnsAug"] and recipe.dedupe_by == "query"


def test_stated_answer_is_the_text_after_the_last_the_answer_is():
    # The release: response.split("The answer is:")[-1].strip()
    assert stated_answer("Half of 10 is 5. The answer is: 5 apples... wait.\nThe answer is: 6") == "6"
    assert stated_answer("x\nThe answer is: \\frac{1}{2}\n") == "\\frac{1}{2}"
    assert stated_answer("no marker here") is None
    row = normalize_row({"query": "q", "response": "Maybe the answer is 3.\nThe answer is: 4"}, 0, "query", "response")
    assert row["answer"] == "4"


def test_the_release_format_prompt_comes_before_the_question():
    seen = []

    class RecordingTokenizer:
        def apply_chat_template(self, messages, **kwargs):
            seen.append(messages)
            return [0]

    build_prompt({"problem": "What is 2+3?"}, load_config("igpo_llada").data, RecordingTokenizer())
    assert seen[-1] == [{"role": "user", "content": RELEASE_FORMAT_PROMPT + "\n\n" + "What is 2+3?"}]
    # The default template is unchanged: the problem, then the instruction.
    build_prompt({"problem": "P"}, DataConfig(instruction="I"), RecordingTokenizer())
    assert seen[-1] == [{"role": "user", "content": "P\nI"}]


@pytest.mark.parametrize("text, score", [
    ("<reasoning>\n2+3=5\n</reasoning>\n<answer>\n\\boxed{5}\n</answer>\n", 0.75),  # everything once
    ("<reasoning>\n2+3=5\n</reasoning>\n<answer>\n5\n</answer>\n", 0.5),  # no box
    ("<reasoning>2+3=5</reasoning><answer>\\boxed{5}</answer>", 0.5),  # no newlines after the openers
    ("<reasoning>\na</reasoning>\n<reasoning>\nb</reasoning>\n<answer>\n\\boxed{5}\n</answer>", 0.5),  # reasoning twice
    ("The sum is \\boxed{5}.", 0.25),
    ("The sum is 5.", 0.0),
])
def test_xmlcount_format_reward_matches_the_release(text, score):
    assert xmlcount_reward(text) == score


@pytest.mark.parametrize("text, answer, correct", [
    ("<answer>\n\\boxed{5}\n</answer> and later \\boxed{6}", "5", 1.0),  # the FIRST box counts
    ("first \\boxed{6}, then \\boxed{5}", "5", 0.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),  # equivalent values
    ("\\boxed{ 12 }", "12", 1.0),  # stripped
    ("The answer is 5.", "5", 0.0),  # no box, no credit
    ("\\boxed{5", "5", 0.0),  # never closed: nothing extracted
])
def test_first_boxed_correctness_matches_the_release(text, answer, correct):
    assert first_boxed_correct_reward(text, answer=answer) == correct


def test_first_boxed_extraction():
    assert first_boxed("\\boxed{a{b}c} \\boxed{d}") == "a{b}c"
    assert first_boxed("nothing") is None


def test_igpo_recipes_use_the_release_rewards_and_optimiser():
    for name in ("igpo_llada", "igpo_ratio0_llada"):
        cfg = load_config(name)
        assert [(f.name, f.weight) for f in cfg.reward.functions] == [("first_boxed_correct", 3.0), ("xmlcount", 1.0)]
        assert (cfg.learner.betas, cfg.learner.weight_decay, cfg.learner.warmup_steps) == ((0.9, 0.99), 0.1, 50)
        assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
        assert cfg.data.instruction == RELEASE_FORMAT_PROMPT
    assert load_config("igpo_llada").igpo.hint_prefix == "<reasoning>\n"


GSM8K_ROW = {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"}


def test_gsm8k_calculator_annotations_are_stripped_from_solutions_by_default():
    row = normalize_row(dict(GSM8K_ROW), 0)
    assert row["solution"] == "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips."
    assert row["answer"] == "72"
    kept = normalize_row(dict(GSM8K_ROW), 0, strip_annotations=False)
    assert "<<48/2=24>>" in kept["solution"]
    assert DataConfig().strip_calculator_annotations is True


def test_stripped_solutions_reach_the_opsd_teacher_context():
    from rl.data import build_teacher_prompt

    class TextTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text}

    row = normalize_row(dict(GSM8K_ROW), 0)
    from rl.algorithms.opsd import OPSDConfig

    context = build_teacher_prompt(row, DataConfig(prompt_format="plain"), TextTokenizer(), OPSDConfig().teacher_template,
                                   "Understand it.", None)
    assert "<<" not in context and "48/2 = 24 clips" in context


def test_the_llada_recipes_share_d1s_evaluation_protocol():
    igpo, baseline = (load_config(n).eval.protocol_settings() for n in ("igpo_llada", "diffu_grpo_llada"))
    assert igpo == baseline
    assert (igpo["temperature"], igpo["k"], igpo["max_tokens"]) == (0.0, 1, 256)
    # d1 eval/gsm8k.py: user message = its format prompt + "\n\n" + question.
    assert igpo["prompt_template"].startswith("You are a math expert.")
    assert igpo["prompt_template"].endswith("<answer>\n\\boxed{...}\n</answer>\n\n{problem}")
