"""d1's evaluation protocol: "<reasoning>" prefilled after the generation prompt (part of the
prompt, not of the graded completion) and GSM8K graded by d1's rule through eval.grader."""
import json

import pytest

from rl.config import ConfigError, EvalConfig, load_config
from rl.evaluate import _scorer, eval_prompt, grade, regrade


class CharTokenizer:
    """Characters as token ids; a chat template that marks the turns in plain text."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **extra):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<assistant>" if add_generation_prompt else "")
        return [ord(c) for c in text] if tokenize else text

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def text(ids):
    return "".join(chr(i) for i in ids)


def test_the_d1_protocol_prefills_reasoning_in_the_prompt():
    cfg = load_config("diffu_grpo_llada").eval
    assert cfg.assistant_prefix == "<reasoning>" and cfg.protocol_settings()["assistant_prefix"] == "<reasoning>"
    ids = eval_prompt({"problem": "What is 2+3?"}, cfg, CharTokenizer())
    assert text(ids).endswith("What is 2+3?<assistant><reasoning>")
    assert 1 not in ids  # no second BOS: the template's text is tokenised without special tokens
    plain = eval_prompt({"problem": "What is 2+3?"}, EvalConfig(prompt_template="{problem}"), CharTokenizer())
    assert text(plain) == "<user>What is 2+3?<assistant>"
    # The IGPO recipe reports with d1's protocol too.
    assert load_config("igpo_llada").eval.protocol_settings() == cfg.protocol_settings()


def test_d1_grades_gsm8k_by_its_rule_and_math500_with_math_verify():
    cfg = load_config("diffu_grpo_llada").eval
    assert (cfg.grader_for("gsm8k"), cfg.grader_for("math500")) == ("d1_gsm8k", "math_verify")
    assert EvalConfig().grader_for("gsm8k") == "math_verify"
    completions = ["\\boxed{72} then \\boxed{5}", "\\boxed{5} then \\boxed{72}", "</reasoning>\n<answer>\n72\n</answer>", "72"]
    with _scorer("last_number", "d1_gsm8k") as scorer:
        assert grade(scorer, completions, [{"answer": "72"}] * 4) == [True, False, True, False]
    with _scorer("last_number") as scorer:  # the default: the last box, else the last number
        assert grade(scorer, completions, [{"answer": "72"}] * 4) == [False, True, True, True]


def test_grader_must_be_a_correctness_reward():
    with pytest.raises(ConfigError, match="not a correctness reward"):
        load_config(None, ["eval.grader=xmlcount"])
    with pytest.raises(ConfigError, match="Unknown reward"):
        load_config(None, ["eval.grader=no_such_grader"])


def test_regrade_uses_each_records_grader(tmp_path):
    record = {"benchmark": "gsm8k", "index": 0, "problem": "p", "answer": "72", "answer_fallback": "last_number",
              "completions": ["\\boxed{72} then \\boxed{5}"], "response_tokens": [9], "finish_reasons": ["stop"],
              "correct": [True]}
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({**record, "grader": "d1_gsm8k"}) + "\n")
    assert regrade(tmp_path)["eval/gsm8k/pass@1"] == 1.0
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps(record) + "\n")  # an older record: math_verify
    assert regrade(tmp_path)["eval/gsm8k/pass@1"] == 0.0
