"""A full disk: the checkpoint write fails with ENOSPC on a real run, and that is the error the user
sees (one paragraph: what, where, how much space it needs and has, the checkpoint to resume from),
exit 1; the half-written checkpoint is removed, never taken for one; the log copy that then fails
too is a warning after the run ended; the last complete checkpoint resumes once there is space.

The run directory is on a tmpfs of this test's own (mount needs root, as CI has here): the disk
really runs out, nothing fakes the error. After step 1's checkpoint the test shrinks the file
system to half a checkpoint more than it holds, and before the log copy to what it holds, as
another writer filling a shared disk would."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from rl import launch
from rl.loop import checkpoint, trainer
from rl.demo.tiny import addition_rows

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _used(path: Path) -> int:
    s = os.statvfs(path)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


def _resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True, capture_output=True)


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted for this test and unmounted after it. Fails (never skips) where it cannot
    be mounted: the test would otherwise pass without ever filling a disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"could not mount a tmpfs at {mount} (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        if os.path.ismount(mount):  # something still holds a file open there
            subprocess.run(["umount", "-l", str(mount)], check=True)


def _args(model, data, out, steps):
    return [
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "grpo.group_size=4", f"train.steps={steps}",
        "train.prompts_per_step=8", "learner.micro_batch_size=32", "learner.lr=1e-3", "checkpoint.every_steps=1",
        f"tracking.output_dir={out}", "tracking.run_name=run",
    ]


def _main(argv) -> int:
    try:
        return launch.main(argv)
    except SystemExit as e:
        return e.code


def test_a_full_disk_fails_the_checkpoint_with_one_paragraph_and_keeps_the_last_one(
    warmed_addition_model, ray_session, small_disk, tmp_path, monkeypatch, capfd
):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(200, seed=5)))
    run_dir = small_disk / "run"
    sizes = {}
    real_save, real_keep_logs = checkpoint.save, trainer.keep_actor_logs

    def save_then_shrink(run, cfg, learners, state, ahead=None):
        path = real_save(run, cfg, learners, state, ahead)
        if state.step == 1:  # the disk fills up: half a checkpoint of room left
            sizes["checkpoint"] = _tree_bytes(path)
            _resize(small_disk, _used(small_disk) + sizes["checkpoint"] // 2)
        return path

    def fill_then_keep_logs(run):
        _resize(small_disk, _used(small_disk))  # full: the copy of any non-empty log fails
        return real_keep_logs(run)

    monkeypatch.setattr(checkpoint, "save", save_then_shrink)
    monkeypatch.setattr(trainer, "keep_actor_logs", fill_then_keep_logs)
    code = _main(_args(warmed_addition_model, data, small_disk, 2))
    err = capfd.readouterr().err

    assert code == 1, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    # The first error, in one paragraph, last on the console: what, where, how much it needs and has.
    paragraph = err.strip().splitlines()[-1]
    target = run_dir / "checkpoints" / "step_000002"
    assert paragraph.startswith(f"stopped: Could not write the checkpoint of step 2 "), err[-4000:]
    assert f"into {target}: the file system is out of space" in paragraph
    need = float(re.search(r"A checkpoint needs about ([\d.]+) MB", paragraph).group(1)) * 2**20
    assert 0.8 * sizes["checkpoint"] <= need <= 2.5 * sizes["checkpoint"], (need, sizes)
    assert re.search(r"has [\d.]+ MB free of [\d.]+ MB", paragraph)
    assert "The partial write was removed" in paragraph
    assert f"The last checkpoint is {run_dir / 'checkpoints' / 'step_000001'} (step 1)" in paragraph
    assert f"resume={run_dir}" in paragraph
    # The log copy failed after it, for want of space too: a warning above, not the error.
    warnings = [line for line in err.splitlines() if line.startswith("warning (cleanup, after the run ended)")]
    assert any("actors' logs" in w and "No space left on device" in w for w in warnings), err[-4000:]
    assert err.index(warnings[0]) < err.index(paragraph)
    # Nothing half-written is left or taken for a checkpoint; step 1's is intact and resumable.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"]
    assert checkpoint.newest(run_dir).name == "step_000001"
    assert checkpoint.resume_config(run_dir, []).train.steps == 2

    # Given space, `resume=` (as the paragraph says) finishes the run from step 1's checkpoint.
    monkeypatch.setattr(checkpoint, "save", real_save)
    monkeypatch.setattr(trainer, "keep_actor_logs", real_keep_logs)
    _resize(small_disk, 64 * 2**20)
    code = _main([f"resume={run_dir}"])
    err = capfd.readouterr().err
    assert code == 0, err[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert (run_dir / "final" / "model.safetensors").exists()
    shutil.rmtree(run_dir)
