"""`--dry-run` validates everything: a local training set is read and checked as the run will read
it (every line valid JSON, every row with a question and a gold answer, at least one row), a local
copy missing while HF_HUB_OFFLINE=1 forbids the hub is an error (online it stays a note), and
`python -m rl.sft` takes `--dry-run` like `python -m rl.launch`. Each case calls the tool's main()
with its argv, as the command line does."""
import json

import pytest

from rl import launch, sft

# The embedded default model: check_model_path accepts it without loading or converting anything.
MODEL = "model.path=smollm2-135m-instruct"


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _launch(capsys, *argv):
    """(exit code, stderr) of `python -m rl.launch recipe=grpo_smollm2 ... --dry-run`."""
    try:
        code = launch.main(["recipe=grpo_smollm2", MODEL, *argv, "--dry-run"])
    except SystemExit as e:  # the launcher's one-paragraph errors exit 2 through sys.exit
        code = e.code
    return code, capsys.readouterr().err


def _sft(capsys, *argv):
    code = sft.main([MODEL, "data.prompt_format=plain", *argv, "--dry-run"])
    return code, capsys.readouterr().err


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """Each test says for itself whether the hub is forbidden."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


GOOD = [{"question": "1+1=", "answer": "#### 2"}, {"question": "2+3=", "answer": "#### 5"}]


def test_a_malformed_jsonl_line_fails_the_dry_run_naming_the_line(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [GOOD[0], '{"question": "2+3=", "answer": "#### 5"', GOOD[1]])
    code, err = _launch(capsys, f"data.train={data}")
    assert code == 2, err
    assert f"{data}:2 is not valid JSON" in err and "Fix or remove that line" in err
    assert "config OK" not in err and "Traceback" not in err


def test_rows_without_an_answer_fail_the_dry_run(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [GOOD[0], {"question": "3+4="}])
    code, err = _launch(capsys, f"data.train={data}")
    assert code == 2, err
    assert "Row 1 has no gold answer" in err and "data.skip_rows_without_answer=true" in err
    # The fix the message names makes the dry run pass, and it says how many rows it checked.
    code, err = _launch(capsys, f"data.train={data}", "data.skip_rows_without_answer=true")
    assert code == 0 and "config OK" in err and f"1 training rows read from {data}" in err, err


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_data_set_fails_the_dry_run(tmp_path, capsys, content):
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    code, err = _launch(capsys, f"data.train={data}")
    assert code == 2, err
    assert f"The training set {data} yields no rows" in err and "config OK" not in err


def test_a_set_that_filters_leave_empty_fails_the_dry_run(tmp_path, capsys):
    data = _write(tmp_path / "train.jsonl", [{**r, "type": "Algebra"} for r in GOOD])
    code, err = _launch(capsys, f"data.train={data}", "data.type_filter=[Geometry]")
    assert code == 2 and "yields no rows" in err and "data.type_filter" in err, err


def test_a_good_local_copy_is_read_and_counted(tmp_path, capsys):
    (tmp_path / "gsm8k").mkdir()
    _write(tmp_path / "gsm8k" / "train.jsonl", GOOD)
    code, err = _launch(capsys, f"data.local_dir={tmp_path}")
    assert code == 0, err
    assert "config OK: recipe grpo_smollm2" in err and f"2 training rows read from {tmp_path}/gsm8k/train.jsonl" in err
    # A malformed local copy is caught the same way as a data.train file.
    _write(tmp_path / "gsm8k" / "train.jsonl", [GOOD[0], "not json"])
    code, err = _launch(capsys, f"data.local_dir={tmp_path}")
    assert code == 2 and "gsm8k/train.jsonl:2 is not valid JSON" in err, err


def test_a_missing_local_dir_is_an_error_offline_and_a_note_online(tmp_path, capsys, monkeypatch):
    missing = f"data.local_dir={tmp_path}/no_dir"
    code, err = _launch(capsys, missing)
    assert code == 0 and "note:" in err and "no_dir does not exist" in err and "from the hub" in err, err
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
        code, err = _launch(capsys, missing)
        assert code == 2, err
        assert "no_dir does not exist" in err and "HF_HUB_OFFLINE is set" in err and "openai/gsm8k" in err
        assert "Set data.local_dir to a folder holding gsm8k/train.jsonl" in err and "config OK" not in err
        monkeypatch.delenv(name)
    # A missing file inside an existing local_dir, offline: the same error.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _launch(capsys, f"data.local_dir={tmp_path}")
    assert code == 2 and f"{tmp_path}/gsm8k/train.jsonl does not exist" in err and "HF_HUB_OFFLINE" in err, err


SFT_GOOD = [{"problem": "1+1=", "solution": "1+1 is 2.", "answer": "2"}, {"problem": "2+2=", "solution": "It is 4.", "answer": "4"}]


def test_sft_takes_dry_run_and_checks_the_data(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    ok = [f"tracking.output_dir={out}", "train.prompts_per_step=2", "learner.micro_batch_size=2"]
    data = _write(tmp_path / "good.jsonl", SFT_GOOD)
    code, err = _sft(capsys, f"data.train={data}", *ok)
    assert code == 0 and "config OK" in err and f"2 training rows read from {data}" in err, err
    assert not out.exists()  # nothing run, nothing written
    # Each problem the RL launcher's dry run finds, and SFT's own: a row without a solution, the batch.
    cases = {
        "malformed": ([SFT_GOOD[0], "{oops"], "malformed.jsonl:2 is not valid JSON"),
        "no_answer": ([SFT_GOOD[0], {"problem": "3+3="}], "Row 1 has no gold answer"),
        "empty": ([], "yields no rows"),
        "no_solution": ([SFT_GOOD[0], {"problem": "5+5=", "answer": "10"}], "SFT needs a reference solution per row, but row 1"),
    }
    for name, (rows, message) in cases.items():
        bad = _write(tmp_path / f"{name}.jsonl", rows)
        code, err = _sft(capsys, f"data.train={bad}", *ok)
        assert code == 2 and message in err and "config OK" not in err, (name, err)
    code, err = _sft(capsys, f"data.train={data}", *ok[:-1], "learner.micro_batch_size=3")
    assert code == 2 and "multiple of learner.micro_batch_size" in err, err
    # The hub rule as in rl.launch: a missing local copy is a note online, an error offline.
    missing = ["data.train=gsm8k", f"data.local_dir={tmp_path}/no_dir", *ok]
    code, err = _sft(capsys, *missing)
    assert code == 0 and "note:" in err and "from the hub" in err, err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = _sft(capsys, *missing)
    assert code == 2 and "HF_HUB_OFFLINE is set" in err, err
    assert not out.exists()


def test_sft_usage_names_dry_run(capsys):
    assert sft.main(["--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out
    assert sft.main(["--bogus"]) == 2
    assert "--dry-run" in capsys.readouterr().err
