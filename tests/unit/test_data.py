"""Dataset loading and gold-answer extraction on the real files in ../shared/data."""
import json

import pytest

from rl.config import DataConfig
from rl.data import DataError, PromptStream, load_rows, normalize_row
from rl.models import ModelError, resolve_model_path

SHARED = "../shared/data"


def test_gsm8k_rows_get_gold_and_solution():
    rows = load_rows(DataConfig(train="gsm8k", split="test", local_dir=SHARED, shuffle=False), seed=0)
    assert len(rows) == 1319
    raw = [json.loads(l) for l in open(f"{__file__.rsplit('/tests/', 1)[0]}/{SHARED}/gsm8k/test.jsonl")]
    for row, src in zip(rows, raw):
        # Independent extraction: the text after the last '####', commas dropped.
        assert row["answer"] == src["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert "####" not in row["solution"] and row["problem"] == src["question"]


def test_math500_rows_keep_their_answer():
    rows = load_rows(DataConfig(train="math500", split="test", local_dir=SHARED, shuffle=False), seed=0)
    assert len(rows) == 500 and all(r["answer"] and r["solution"] for r in rows)


def test_row_without_answer_is_a_clear_error():
    with pytest.raises(DataError, match="Row 7 has no gold answer"):
        normalize_row({"question": "1+1?", "solution": "two"}, 7)
    with pytest.raises(DataError, match="no question column"):
        normalize_row({"text": "1+1?", "answer": "2"}, 0)
    # A MATH-style row without an answer column falls back to its solution's last \boxed{}.
    assert normalize_row({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}"}, 0)["answer"] == "\\frac{1}{2}"


def test_missing_local_file_and_unreachable_hub_are_explained(tmp_path, monkeypatch):
    import rl.data

    def unreachable(name, config, split):  # this machine is offline: the hub fails as it would here
        raise DataError(f"Could not load dataset {name!r} from the hub")

    monkeypatch.setattr(rl.data, "_read_hub", unreachable)
    with pytest.raises(DataError, match="data.local_dir"):
        load_rows(DataConfig(train="gsm8k", local_dir=str(tmp_path)), seed=0)
    with pytest.raises(ModelError, match="hub may be unreachable"):
        resolve_model_path("no-such-org/no-such-model")


def test_prompt_stream_order_is_reproducible_and_covers_each_epoch():
    rows = [{"i": i} for i in range(7)]
    a = PromptStream(rows, seed=3)
    first = [r["i"] for r in a.take(10)]
    assert sorted(first[:7]) == list(range(7))  # one epoch: every row exactly once
    b = PromptStream(rows, seed=3, position=4)
    assert [r["i"] for r in b.take(6)] == first[4:10]  # resuming at a position continues exactly


def test_metamath_rows_take_solution_and_answer_from_the_response():
    row = {"query": "What is 2+3?", "response": "We add: 2+3=5.\nThe answer is: 5", "type": "GSM_AnsAug"}
    out = normalize_row(row, 0, question_key="query", solution_key="response")
    assert (out["problem"], out["solution"], out["answer"]) == ("What is 2+3?", row["response"], "5")
    with pytest.raises(DataError, match="data.solution_key"):
        normalize_row({"query": "q", "answer": "1"}, 3, question_key="query", solution_key="response")
