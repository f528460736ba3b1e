"""Operator experience without a cluster: clean errors and dry-run path checks, the data hub
fallback, the divergence guard's rules, Ctrl-C handling, the console without a terminal, the
trackers read back (TensorBoard event files, a W&B offline run) and the curves PNG."""
import io
import json
import math
import os
import signal
import subprocess
import sys

import pytest

from rl import data as data_module
from rl.config import DataConfig
from rl.core.paths import PROJECT_ROOT
from rl.data import DataError, check_prompts_fit, load_rows
from rl.loop.guards import DivergenceGuard, GracefulStop, has_signal
from rl.loop.stopped import RunStopped
from rl.models import ModelError, check_model_path, resolve_model_path
from rl.loop.tracking import Console, Tracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _launch(*args):
    return subprocess.run([sys.executable, "-m", "rl.launch", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# Clean errors and the dry run


def test_folder_that_is_not_a_model_is_one_paragraph(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="names no model"):
        check_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="names no model"):
        resolve_model_path(str(tmp_path))
    proc = _launch("recipe=grpo_smollm2", f"model.path={tmp_path}", f"tracking.output_dir={tmp_path}/runs")
    assert proc.returncode == 2 and "names no model" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_dry_run_checks_every_local_path(tmp_path, tiny_model):
    ok = [f"model.path={tiny_model}", "--dry-run"]
    # A data file that does not exist.
    proc = _launch("recipe=grpo_smollm2", f"data.train={tmp_path}/nope.jsonl", *ok)
    assert proc.returncode == 2 and "nope.jsonl does not exist" in proc.stderr and "Traceback" not in proc.stderr
    # A folder that is not a model.
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    proc = _launch("recipe=grpo_smollm2", f"model.path={tmp_path}/empty", "--dry-run")
    assert proc.returncode == 2 and "names no model" in proc.stderr
    # A reward file that does not exist.
    proc = _launch("recipe=grpo_smollm2", *ok, f"reward.functions=[{{name: {tmp_path}/r.py:score}}]")
    assert proc.returncode == 2 and "r.py" in proc.stderr and "does not exist" in proc.stderr
    # A missing data.local_dir is said (the hub stands in for it), not silently passed.
    proc = _launch("recipe=grpo_smollm2", *ok, f"data.local_dir={tmp_path}/no_dir")
    assert proc.returncode == 0 and "no_dir does not exist" in proc.stderr and "from the hub" in proc.stderr
    # All present: passes, and says nothing about the data.
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    proc = _launch("recipe=grpo_smollm2", *ok, f"data.train={rows}")
    assert proc.returncode == 0 and "config OK" in proc.stderr and "note:" not in proc.stderr, proc.stderr


def test_max_prompt_tokens_below_every_prompt_is_a_data_error(tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [{"problem": f"{a}+{a}=", "answer": str(2 * a)} for a in range(10, 30)]
    cfg = DataConfig(prompt_format="plain", max_prompt_tokens=3)  # every prompt is 5 single-digit/sign tokens
    shortest = min(len(tokenizer(r["problem"], add_special_tokens=False)["input_ids"]) for r in rows)
    assert shortest > 3
    with pytest.raises(DataError, match=f"smaller than every prompt.*at least {shortest}"):
        check_prompts_fit(rows, cfg, tokenizer)
    check_prompts_fit(rows, cfg.model_copy(update={"max_prompt_tokens": shortest}), tokenizer)  # one fits: fine


# ---------------------------------------------------------------------------------------------
# Data: local copy, else the hub (said once), else one error naming both


def test_data_local_copy_then_hub_then_error(tmp_path, monkeypatch, capsys):
    hub_calls = []

    def hub(name, config, split):
        hub_calls.append((name, config, split))
        return [{"question": "2+2=", "answer": "#### 4"}]

    monkeypatch.setattr(data_module, "_read_hub", hub)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text(json.dumps({"question": "1+1=", "answer": "#### 2"}) + "\n")
    local = load_rows(DataConfig(train="gsm8k", local_dir=str(tmp_path)), seed=0)
    assert [r["answer"] for r in local] == ["2"] and hub_calls == []

    missing = DataConfig(train="gsm8k", local_dir=str(tmp_path / "elsewhere"))
    assert [r["answer"] for r in load_rows(missing, seed=0)] == ["4"]
    assert [r["answer"] for r in load_rows(missing, seed=0)] == ["4"]
    assert hub_calls == [("openai/gsm8k", "main", "train")] * 2
    assert capsys.readouterr().out.count("loading openai/gsm8k from the hub") == 1  # said once

    def unreachable(name, config, split):
        raise DataError("hub unreachable")

    monkeypatch.setattr(data_module, "_read_hub", unreachable)
    with pytest.raises(DataError, match="neither in `data.local_dir`.*elsewhere.*hub unreachable"):
        load_rows(missing, seed=0)


# ---------------------------------------------------------------------------------------------
# Divergence guard rules (the end-to-end checks are in test_operator_runs.py)


def _guard(tmp_path, stop=True, max_skipped=1, vocab=1000):
    warnings = []
    return DivergenceGuard(max_skipped, stop, vocab, tmp_path, warn=warnings.append), warnings


def test_guard_counts_skips_and_stops_on_the_second_in_a_row(tmp_path):
    guard, warnings = _guard(tmp_path)
    fine = {"loss": 0.1, "grad_norm": 0.5, "update_skipped": 0.0}
    guard.record_update(1, fine)
    guard.check(1, {"entropy": 1.0, "grad_norm": 0.5}, True)
    guard.record_update(2, {"loss": math.nan, "grad_norm": math.inf, "update_skipped": 1.0})
    guard.check(2, {"grad_norm": math.inf}, True)  # one in a row: tolerated
    assert guard.skipped == 1 and len(warnings) == 1 and "skipped" in warnings[0]
    guard.record_update(3, fine)  # the run recovers: the count in a row starts over
    guard.check(3, {"entropy": 1.0, "grad_norm": 0.5}, True)
    guard.record_update(4, {"loss": math.inf, "grad_norm": 1.0, "update_skipped": 1.0})
    guard.check(4, {}, True)
    guard.record_update(5, {"loss": math.nan, "grad_norm": math.nan, "update_skipped": 1.0})
    with pytest.raises(RunStopped, match=r"2 updates in a row up to step 5.*no checkpoint") as stopped:
        guard.check(5, {}, True)
    assert stopped.value.exit_code == 1 and guard.skipped == 3


def test_guard_collapse_rules(tmp_path):
    uniform = math.log(1000)
    guard, _ = _guard(tmp_path)
    guard.check(1, {"entropy": 0.9 * uniform, "grad_norm": 1.0}, True)  # started uniform (random init): not a collapse
    guard.check(2, {"entropy": uniform, "grad_norm": 1.0}, True)
    guard, _ = _guard(tmp_path)
    guard.check(1, {"entropy": 0.8 * uniform, "grad_norm": 1.0}, True)  # barely trained: too close to tell
    guard.check(2, {"entropy": uniform, "grad_norm": 1.0}, True)
    guard, _ = _guard(tmp_path)
    guard.check(1, {"entropy": 2.0, "grad_norm": 1.0}, True)
    guard.check(2, {"entropy": 0.85 * uniform, "grad_norm": 1.0}, True)  # high, but not uniform
    with pytest.raises(RunStopped, match=r"collapsed at step 3.*entropy is 6.91.*ln\(vocabulary\) = 6.91"):
        guard.check(3, {"entropy": uniform, "grad_norm": 1.0}, True)
    guard, _ = _guard(tmp_path)
    guard.check(1, {"grad_norm": 0.0}, False)  # no signal: a zero gradient is expected
    with pytest.raises(RunStopped, match="gradient norm is exactly 0 although the advantages are not"):
        guard.check(2, {"grad_norm": 0.0}, True)
    guard, warnings = _guard(tmp_path, stop=False)
    guard.check(1, {"grad_norm": 0.0}, True)  # stop_on_collapse=false: a loud warning only
    assert len(warnings) == 1 and "collapsed" in warnings[0]


def test_has_signal_reads_advantages_under_the_loss_mask():
    assert has_signal({"advantages": [[0.0, 0.0], [0.5]], "loss_mask": [[1.0, 1.0], [1.0]]})
    assert not has_signal({"advantages": [[0.0, 0.0], [0.5]], "loss_mask": [[1.0, 1.0], [0.0]]})
    assert not has_signal({"advantages": [[0.0]]}) and not has_signal({})


def test_first_signal_asks_to_stop_second_interrupts():
    said = []
    # What was there before (SIG_IGN when the suite runs as a background job, else Python's default).
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with GracefulStop(announce=said.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143 and "SIGTERM" in said[0]
        with pytest.raises(KeyboardInterrupt, match="^$"):  # ours, raised bare, without a second announcement
            os.kill(os.getpid(), signal.SIGINT)
        assert len(said) == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored


# ---------------------------------------------------------------------------------------------
# Console, trackers, curves


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def test_console_without_a_terminal_is_one_line_per_step():
    out = _Pipe()
    console = Console(total_steps=3, stream=out)
    console.stage("generation")  # nothing on a pipe
    for step in (1, 2, 3):
        console.step(step, {"reward": 0.5, "accuracy": 0.25, "response_length": 12.0, "rollout_tokens": 100})
    console.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("step 1/3 | reward 0.500 | acc 0.250 | len 12")
    assert "tok/s" in lines[0] and "s/step" in lines[0] and "ETA" in lines[0]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_console_on_a_terminal_is_a_live_bar_with_lines_above_it():
    out = _Terminal()
    console = Console(total_steps=4, first_step=2, stream=out)  # a resumed run: step 1 was done before
    console.stage("generation")
    assert "generation" in out.getvalue() and "1/4" in out.getvalue()
    console.line("warning: something that matters")
    console.step(2, {"reward": 0.5, "rollout_tokens": 100})
    console.close()
    text = out.getvalue()
    assert "warning: something that matters\n" in text
    assert "2/4" in text and "reward 0.500" in text and "tok/s" in text and "s/step" in text


def _metrics(step):
    return {"reward": 0.1 * step, "accuracy": 0.05 * step, "response_length": 10.0 + step, "entropy": 2.0 - 0.1 * step,
            "kl": 0.01 * step, "logprob_gap": 1e-6, "cumulative_rollout_tokens": 100 * step, "time/generation": 1.0,
            "time/learner": 2.0, "time/sync": 0.1, "time/reward": 0.01}


def test_tensorboard_and_wandb_offline_hold_the_step_metrics(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(tmp_path, 3, {"seed": 0}, wandb=True, tensorboard=True, console=Console(3, stream=_Pipe()))
    for step in (1, 2, 3):
        tracker.log(step, _metrics(step))
    tracker.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    reward = [(e.step, e.value) for e in events.Scalars("reward")]
    assert reward == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert [e.value for e in events.Scalars("time/learner")] == [2.0, 2.0, 2.0]

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history = _wandb_history(next(runs[0].glob("*.wandb")))
    assert [h["_step"] for h in history] == [1, 2, 3]
    assert [h["reward"] for h in history] == pytest.approx([0.1, 0.2, 0.3])
    assert [h["time/learner"] for h in history] == [2.0, 2.0, 2.0]


def _wandb_history(path):
    """The logged rows of a W&B offline run file. The file is a LevelDB-style log (a 7-byte header
    `:W&B` + magic + version, then 32 KiB blocks of records, each with a 7-byte header: crc32,
    length, type 1 full / 2 first / 3 middle / 4 last) of protobuf `Record`s; read here by hand,
    as wandb's Go core no longer ships a Python reader."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, block = path.read_bytes(), 32768
    assert raw[:4] == b":W&B"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunk, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding at the end of the file
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_curves_png_is_drawn_and_redrawn_by_rl_plot(tmp_path):
    import matplotlib.image

    with (tmp_path / "metrics.jsonl").open("w") as f:
        for step in (1, 2, 3, 4):
            f.write(json.dumps({"step": step, **_metrics(step)}) + "\n")
        f.write('{"step": 5, "rew')  # a line cut short by a kill is skipped
    proc = subprocess.run([sys.executable, "-m", "rl.plot", f"run={tmp_path}"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 600 and image.shape[1] > 600  # 7 panels x 2 columns
    proc = subprocess.run([sys.executable, "-m", "rl.plot", f"run={tmp_path / 'nope'}"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "metrics.jsonl does not exist" in proc.stderr
    # The old positional style is named, with the usage.
    proc = subprocess.run([sys.executable, "-m", "rl.plot", str(tmp_path)], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and f"Argument `{tmp_path}` is not of the form key=value" in proc.stderr
    assert "usage: python -m rl.plot run=RUN_DIR [out=OUT.png]" in proc.stderr


def test_a_resumed_guard_measures_against_the_runs_first_step(tmp_path):
    guard = DivergenceGuard(3, True, vocab_size=100, run_dir=tmp_path, warn=lambda message: None)
    records = [{"step": 1, "entropy": 2.0, "response_length": 100.0},
               {"step": 2, "entropy": 3.2, "response_length": 40.0, "entropy/vs_first": 1.6, "response_length/vs_first": 0.4}]
    guard.resume_from(records)
    assert guard.relative({"entropy": 3.0, "response_length": 50.0}) == {"entropy/vs_first": 1.5, "response_length/vs_first": 0.5}
    assert guard.rise_and_fall == 1  # step 2 was the first of a streak; one more such step stops the run
    with pytest.raises(RunStopped, match="entropy per token rose"):
        guard.check(3, {"entropy": 3.0, "response_length": 50.0}, advantages_nonzero=False)
