"""Exact resume: checkpoints hold the whole run state, are written atomically, survive kill -9.

The end-to-end checks run GRPO on a tiny model warmed up on `a+b=` (so that rewards vary and
every step moves the weights): 4 steps in one go against 2 steps + resume + 2 steps, and a
launch killed with SIGKILL in the middle of writing a checkpoint, then resumed.
"""
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import ray
import torch
from safetensors.torch import load_file

from rl.loop import checkpoint
from rl.core.batch import SequenceBatch
from rl.loop.checkpoint import CheckpointError, TrainerState
from rl.algorithms.opsd import TeacherConfig
from rl.config import ConfigError, LearnerConfig, LoraConfig, load_config
from rl.core.paths import PROJECT_ROOT
from rl.data import PromptStream
from rl.demo.tiny import addition_rows
from rl.core.types import SamplingSpec

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

@pytest.fixture(scope="module")
def resume_setup(warmed_addition_model, tmp_path_factory):
    # 60 warm-up steps leave the model right on a few `a+b=` prompts in ten: rewards vary within
    # groups, so every step has a gradient.
    data = tmp_path_factory.mktemp("resume") / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_rows(500, seed=5)))
    return warmed_addition_model, data


def _overrides(model, data, out, name, steps, extra=()):
    return [
        f"model.path={model}", f"data.train={data}", "data.prompt_format=plain", "data.max_prompt_tokens=16",
        "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25", "grpo.group_size=4", f"train.steps={steps}",
        "train.prompts_per_step=8", "learner.micro_batch_size=32", "learner.lr=1e-3", "learner.warmup_steps=3",
        f"tracking.output_dir={out}", f"tracking.run_name={name}", *extra,
    ]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _names(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def _untimed(record):
    """What two runs of the same steps must agree on: all but clock times."""
    return {k: v for k, v in record.items() if not k.startswith("time/") and k != "wall_time"}


def _assert_same_records(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        x, y = _untimed(x), _untimed(y)
        assert x.keys() == y.keys()
        assert x == pytest.approx(y, abs=1e-6, rel=0), f"step {x['step']}"


# ---------------------------------------------------------------------------------------------
# The real run


def test_two_halves_with_a_resume_equal_one_run(resume_setup, ray_session, tmp_path, monkeypatch):
    from rl.loop.trainer import train

    model, data = resume_setup
    taken = []  # (stream position, questions) of each draw
    take = PromptStream.take

    def recording_take(stream, n):
        position = stream.position
        rows = take(stream, n)
        taken.append((position, [r["question"] for r in rows]))
        return rows

    monkeypatch.setattr(PromptStream, "take", recording_take)

    def run(name, steps, resume=False):
        cfg = load_config(None, _overrides(model, data, tmp_path, name, steps, ["checkpoint.every_steps=2", "checkpoint.keep_last=1"]))
        (tmp_path / name).mkdir(exist_ok=True)
        train(cfg, tmp_path / name, resume=resume)

    run("whole", 4)
    rows_whole, taken[:] = list(taken), []
    run("split", 2)
    assert _names(tmp_path / "split") == ["step_000002"]
    run("split", 4, resume=True)
    rows_split = list(taken)

    whole, split = _records(tmp_path / "whole"), _records(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3, 4]
    _assert_same_records(whole, split)
    assert all(r["grad_norm"] > 0 for r in whole) and whole[-1]["cumulative_rollout_tokens"] > 0
    assert rows_split == rows_whole and [pos for pos, _ in rows_whole] == [0, 8, 16, 24]  # no replay, no skip
    a, b = load_file(tmp_path / "whole/final/model.safetensors"), load_file(tmp_path / "split/final/model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - load_file(model / "model.safetensors")[k]).abs().max().item() for k in a) > 1e-4
    assert _names(tmp_path / "whole") == _names(tmp_path / "split") == ["step_000004"]  # keep_last=1


def test_kill_9_while_writing_a_checkpoint_leaves_a_resumable_run(resume_setup, tmp_path):
    """SIGKILL to the whole launch (driver, Ray, engines, learner ranks) while step 4's checkpoint
    is half-written: step 2's stays the newest, and `resume=` redoes steps 3-4 as they first ran."""
    model, data = resume_setup
    run_dir = tmp_path / "run"
    args = _overrides(model, data, tmp_path, "run", 4, ["checkpoint.every_steps=2", "learner.num_learners=2", "learner.zero_stage=3"])
    # rl.launch with step 4's checkpoint stalled once written, before the rename that commits it.
    stalling_launch = [sys.executable, str(PROJECT_ROOT / "tests/fixtures/stalling_launch.py"), "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    with (tmp_path / "killed.log").open("w") as log:
        proc = subprocess.Popen([*stalling_launch, *args], cwd=PROJECT_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 300
            # The trainer state is the last file written into the checkpoint, right before the stall.
            while not list((run_dir / "checkpoints").glob(f"step_000004.tmp-*/{checkpoint.STATE_FILE}")):
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.time() < deadline, "the run never reached step 4's checkpoint"
                time.sleep(0.5)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    killed = _records(run_dir)
    assert [r["step"] for r in killed] == [1, 2, 3, 4]
    assert checkpoint.newest(run_dir).name == "step_000002"

    proc = subprocess.run([sys.executable, "-m", "rl.launch", f"resume={run_dir}"], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_records(killed, _records(run_dir))  # steps 3-4 replaced, not duplicated
    assert _names(run_dir) == ["step_000002", "step_000004"]  # the half-written one cleaned up
    assert (run_dir / "final" / "model.safetensors").exists()
    # A fresh launch over it is refused before any work (it would mix two runs' checkpoints).
    proc = subprocess.run([sys.executable, "-m", "rl.launch", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and f"resume={run_dir}" in proc.stderr, proc.stderr[-3000:]


def test_set_step_seed_makes_sampling_independent_of_history(resume_setup, ray_session):
    from rollouts.hf_engine import HFEngine
    from rollouts.pool import RolloutPool

    model, _ = resume_setup
    spec = SamplingSpec(n=4, temperature=1.0, max_tokens=4)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]

    def check(engine):
        def sample(seed):
            engine.set_step_seed(seed)
            return [[c.token_ids for c in group] for group in engine.generate(prompts, spec)]

        first = sample(7)
        engine.generate(prompts, spec)  # history that an unbroken run has and a resumed one has not
        assert sample(7) == first
        assert sample(8) != first

    pool = RolloutPool("vllm", str(model), seed=0, max_model_len=32, kv_cache_gb=0.25)
    try:
        check(pool)
    finally:
        pool.close()
    check(HFEngine(str(model), seed=0, max_model_len=32))


def nll_loss(out, mb):
    logp = torch.log_softmax(out.logits(), -1).gather(-1, mb.completion_ids[..., None])[..., 0]
    return -(logp * mb.completion_mask).sum() / mb.loss_normalizer, {}


def _batch(seed):
    rng = random.Random(seed)
    ids = [[rng.randrange(5, 300) for _ in range(n)] for n in (5, 7, 4, 6)]
    return SequenceBatch(ids, [2, 3, 1, 2], loss_normalizer=18.0)


def _on_ranks(group, fn):
    """fn(worker) on every rank (collectives inside need them all); rank 0's answer."""
    return ray.get([w.__ray_call__.remote(fn) for w in group.workers])[0]


def test_learner_checkpoint_restores_optimizer_schedule_rng_and_ema_teacher(resume_setup, ray_session, tmp_path):
    """The learner side's hardest layout: ZeRO-3 (partitioned weights), bf16 (the EMA teacher keeps
    float32 masters), LoRA (only adapters saved), warm-up mid-way (the schedule must resume)."""
    from rl.learner.group import LearnerGroup

    model, _ = resume_setup
    cfg = LearnerConfig(zero_stage=3, micro_batch_size=2, lr=1e-2, warmup_steps=3)
    teacher = TeacherConfig(kind="ema", ema_decay=0.5)
    lora = LoraConfig(enabled=True, rank=4, alpha=8)

    def after_step_2(group):
        metrics = group.train_step(_batch(2), nll_loss)
        ema = _on_ranks(group, lambda w: w.frozen.ema_state())
        return metrics, group.full_state_dict(), ema, _on_ranks(group, lambda w: torch.rand(3))

    group = LearnerGroup(str(model), cfg, "bfloat16", seed=0, total_steps=4, teacher=teacher, lora=lora)
    group.train_step(_batch(1), nll_loss)
    _on_ranks(group, lambda w: torch.rand(5))  # moves the rank's RNG away from where a fresh one starts
    group.save_checkpoint(str(tmp_path))
    metrics, weights, ema, rng = after_step_2(group)
    group.close()
    group = LearnerGroup(str(model), cfg, "bfloat16", seed=0, total_steps=4, teacher=teacher, lora=lora)
    group.load_checkpoint(str(tmp_path))
    metrics2, weights2, ema2, rng2 = after_step_2(group)
    group.close()

    assert metrics2 == metrics and metrics["lr"] == pytest.approx(2e-2 / 3)
    assert all(torch.equal(weights2[k], weights[k]) for k in weights)
    assert all(torch.equal(ema2[k], ema[k]) for k in ema) and torch.equal(rng2, rng)
    assert ema and all(v.dtype == torch.float32 for v in ema.values())  # the masters of bf16 weights


# ---------------------------------------------------------------------------------------------
# The checkpoint directory's rules, with stand-ins for the learners and the engines


class FakeLearners:
    def __init__(self, run_dir=None, keep=0):
        self.run_dir, self.keep, self.saves, self.loaded = run_dir, keep, 0, None

    def save_checkpoint(self, out_dir):
        # Retention may only act once the new checkpoint is complete: the older ones still exist.
        if self.run_dir is not None:
            assert len(checkpoint.complete_checkpoints(self.run_dir)) == min(self.keep, self.saves)
        self.saves += 1
        torch.save({"w": torch.ones(2)}, os.path.join(out_dir, "weights.pt"))

    def load_checkpoint(self, in_dir):
        self.loaded = in_dir

    def full_state_dict(self):
        return {"w": torch.ones(2)}


def _cfg(*extra):
    return load_config(None, ["checkpoint.every_steps=2", "checkpoint.keep_last=2", "train.steps=5", *extra])


def test_keep_last_k_and_incomplete_checkpoints(tmp_path):
    cfg = _cfg()
    assert [s for s in range(1, 6) if checkpoint.save_due(cfg, s)] == [2, 4, 5]
    learners = FakeLearners(tmp_path, keep=2)
    for step in range(1, 6):
        checkpoint.save(tmp_path, cfg, learners, TrainerState(step, 8 * step, 100 * step))
        assert _names(tmp_path) == [f"step_{s:06d}" for s in range(max(1, step - 1), step + 1)]
    # What a kill during a save or a deletion leaves: never a checkpoint, removed on resume.
    for leftover in ("step_000006.tmp-123", "step_000003.tmp-456"):
        (tmp_path / "checkpoints" / leftover).mkdir()
    assert checkpoint.newest(tmp_path).name == "step_000005"
    assert checkpoint.read_state(checkpoint.newest(tmp_path)) == TrainerState(5, 40, 500)
    checkpoint.remove_incomplete(tmp_path)
    assert _names(tmp_path) == ["step_000004", "step_000005"]


def test_resume_restores_counters_and_rng_and_drops_later_records(tmp_path):
    cfg = _cfg()
    random.seed(1)
    checkpoint.save(tmp_path, cfg, FakeLearners(), TrainerState(2, 16, 200))
    expected = random.random()
    lines = [json.dumps({"step": s, "reward": 0.1 * s}) for s in range(4)] + ['{"step": 4, "rew']  # torn by a kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    random.seed(99)
    learners, stream = FakeLearners(), SimpleNamespace(position=0)
    pool = SimpleNamespace(weights=None)

    def push():  # the run's transport: the engines get the learner's restored weights
        pool.weights = learners.full_state_dict()

    assert checkpoint.resume(tmp_path, cfg, learners, push, stream) == (TrainerState(2, 16, 200), None)
    assert stream.position == 16 and random.random() == expected
    assert learners.loaded.endswith("step_000002/learner") and torch.equal(pool.weights["w"], torch.ones(2))
    assert [r["step"] for r in _records(tmp_path)] == [0, 1, 2]
    # Changing the math under a checkpoint is refused, naming what changed; extending it is not.
    with pytest.raises(CheckpointError, match="grpo.kl_coef"):
        checkpoint.resume(tmp_path, _cfg("grpo.kl_coef=0.1"), learners, push, stream)
    checkpoint.resume(tmp_path, _cfg("train.steps=9", "checkpoint.keep_last=5"), learners, push, stream)
    # Saved before the schema gained an option (so another hash), with nothing changed: resumes.
    state_file = checkpoint.newest(tmp_path) / checkpoint.STATE_FILE
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "config_hash": "older schema"}))
    checkpoint.resume(tmp_path, cfg, learners, push, stream)


def test_resume_config_accepts_only_overrides_that_keep_the_math(tmp_path):
    (tmp_path / "config.yaml").write_text(_cfg().to_yaml())
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        checkpoint.resume_config(tmp_path, [])
    checkpoint.save(tmp_path, _cfg(), FakeLearners(), TrainerState(4, 32, 400))
    assert checkpoint.resume_config(tmp_path, ["train.steps=10", "tracking.wandb=false"]).train.steps == 10
    with pytest.raises(ConfigError, match="grpo.kl_coef, learner.lr"):
        checkpoint.resume_config(tmp_path, ["learner.lr=1", "grpo.kl_coef=0.1"])
    with pytest.raises(ConfigError, match="below the step of the newest checkpoint"):
        checkpoint.resume_config(tmp_path, ["train.steps=3"])


def test_step_seeds_depend_on_run_seed_and_step_only():
    # Not on the driver's RNG state, nor on the process (string hashing is salted per process):
    # a fresh interpreter with another hash seed draws the same seed as this one.
    random.seed(1)
    here = checkpoint.step_seed(0, 3)
    random.seed(2)
    assert checkpoint.step_seed(0, 3) == here
    code = "from rl.loop.checkpoint import step_seed; print(step_seed(0, 3))"
    other = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert int(other.stdout) == here
    assert len({checkpoint.step_seed(s, t) for s in range(3) for t in range(100)}) == 300
    assert all(0 <= checkpoint.step_seed(0, t) < 2**31 for t in range(100))
