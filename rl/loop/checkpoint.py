"""Run-state checkpoints: what a run needs to go on exactly as if it had never stopped.

One directory per saved step:

    <run>/checkpoints/step_000010/
        learner/            every rank's part (LearnerWorker.save_checkpoint): DeepSpeed's checkpoint
                            in deepspeed/ (model or LoRA adapters, optimizer, lr schedule), each
                            rank's RNG states, and the EMA teacher's weights when there is one
        rng.pt              the driver's python / numpy / torch RNG states
        trainer_state.json  step, data stream position, cumulative rollout tokens, config hash
        config.yaml         the config it was written under
        rollouts_ahead.pkl  with train.max_staleness >= 1 only: the next step's rollouts, generated
                            during this step with the weights before its update, and that version

The rollout engines need nothing saved: on resume they get the learner's weights, and their
sampler is reseeded before every step with `step_seed(run seed, step)`, so step s samples the
same whether or not the run stopped before it. An overlapped run's next batch was sampled with
weights the checkpoint no longer holds, so that batch itself is saved: a resumed run trains on
it, one version old, as the uninterrupted run did.

Atomic: a checkpoint is written as `step_000010.tmp-<pid>`, flushed to disk, then renamed. Only
`step_<digits>` directories count, so a run killed while saving (or while deleting an old
checkpoint, which is renamed away first) still has its previous checkpoint as the newest.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rl.config import ConfigError, RunConfig, load_config, parse_overrides
from rl.core.rng import rng_state, set_rng_state
from rl.loop.stopped import RunStopped

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
AHEAD_FILE = "rollouts_ahead.pkl"
_COMPLETE = re.compile(r"step_\d+")

# What a resume may change: none of these alters what a step computes. Everything else is part of
# the config hash, because a resumed run that trained differently would no longer be "the same
# run, continued" (the learner layout, the data, the sampling, the loss). `tracking.*` names where
# the run was created; a resume continues in the directory it is given.
RESUME_OVERRIDABLE = (
    "train.steps",  # extend (or end earlier): the lr schedule is a warm-up, then constant
    "train.save_final",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "tracking.wandb",
    "tracking.tensorboard",
    "tracking.verbose",
    "eval.every_steps",  # evaluation samples after a step; the next step reseeds the engines
    "sync.check_sequences",  # a read-only check
    "reward.workers",  # where rewards run, not what they return
    "rollout.max_restarts",  # how failures are handled, not what a step computes
    "rollout.timeout_s",
    "train.max_skipped_updates",
    "train.stop_on_collapse",
    "checkpoint.on_interrupt",
)


class CheckpointError(ValueError):
    """A run directory cannot be resumed as asked."""


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (a full disk, most often): its partial directory is gone,
    the message names what, where, how much space it needs and the last complete checkpoint."""


@dataclass
class TrainerState:
    """The loop's counters after `step`; with the seed they fix everything the driver does next."""

    step: int = 0
    data_position: int = 0
    cumulative_rollout_tokens: int = 0


def step_seed(run_seed: int, step: int) -> int:
    """The rollout sampling seed of `step`: a function of the run seed and the step alone.
    31 bits: numpy takes seeds below 2**32, and the pool adds the engine index."""
    return random.Random(f"rollout-{run_seed}-{step}").getrandbits(31)


# ---------------------------------------------------------------------------------------------
# RNG states of one process


# ---------------------------------------------------------------------------------------------
# Config identity


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _math_config(cfg: RunConfig) -> dict:
    flat = _flat(cfg.model_dump(mode="json"))
    return {k: v for k, v in flat.items() if k not in RESUME_OVERRIDABLE and not k.startswith("tracking.")}


def config_hash(cfg: RunConfig) -> str:
    """Hash of every option that changes what the steps compute."""
    return hashlib.sha256(json.dumps(_math_config(cfg), sort_keys=True).encode()).hexdigest()


def _check_same_run(cfg: RunConfig, checkpoint: Path, saved_hash: str) -> None:
    if config_hash(cfg) == saved_hash:
        return
    # The hashes also differ when the schema gained options since the save; the saved config,
    # read with today's defaults for those, tells that apart from a real change.
    now, then = _math_config(cfg), _math_config(load_config(str(checkpoint / "config.yaml")))
    changed = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
    if not changed:
        return
    raise CheckpointError(
        f"The config differs from the one checkpoint {checkpoint} was written under, in options that "
        f"change the training itself: {', '.join(changed)}. A resume may change only "
        f"{', '.join(RESUME_OVERRIDABLE)}; start a new run for anything else."
    )


def resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """RUN_DIR/config.yaml with `overrides`, which may touch only RESUME_OVERRIDABLE keys."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"resume={run_dir}: no {path}; resume takes the run directory of an earlier run.")
    refused = sorted(k for k in _flat(parse_overrides(overrides)) if k not in RESUME_OVERRIDABLE)
    if refused:
        raise ConfigError(
            f"resume cannot change {', '.join(refused)}: that would change what the remaining steps compute. "
            f"A resume may override only {', '.join(RESUME_OVERRIDABLE)}."
        )
    cfg = load_config(str(path), overrides)
    found = newest(run_dir)
    if found is None:
        raise ConfigError(
            f"resume={run_dir}: no complete checkpoint in {Path(run_dir) / CHECKPOINTS}; the run saved none "
            "(checkpoint.every_steps is 0, or it stopped before the first one)."
        )
    done = read_state(found).step
    if cfg.train.steps < done:
        raise ConfigError(f"train.steps={cfg.train.steps} is below the step of the newest checkpoint ({done}).")
    return cfg


# ---------------------------------------------------------------------------------------------
# Directories


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    found = [p for p in (Path(run_dir) / CHECKPOINTS).glob("step_*") if _COMPLETE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def newest(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> TrainerState:
    saved = json.loads((checkpoint / STATE_FILE).read_text())
    return TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__})


def checkpoint_note(run_dir: Path) -> str:
    """`the last checkpoint is ...; continue with resume=...`, or that there is none."""
    latest = newest(run_dir)
    if latest is None:
        return "There is no checkpoint to continue from (checkpoint.every_steps=0, or none was due yet)."
    return (
        f"The last checkpoint is {latest} (step {read_state(latest).step}); continue from it with "
        f"`python -m rl.launch resume={run_dir}`."
    )


def _fsync(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root to disk (the learner ranks wrote theirs unflushed)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace path's content all at once: a reader (or a kill) sees the old file or the new one."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(checkpoint: Path) -> None:
    # Renamed first: a deletion cut short must not leave a damaged directory that looks complete.
    doomed = checkpoint.with_name(f"{checkpoint.name}.tmp-{os.getpid()}")
    os.rename(checkpoint, doomed)
    shutil.rmtree(doomed)


def remove_incomplete(run_dir: Path) -> None:
    """Delete what runs killed while saving left behind."""
    for leftover in (Path(run_dir) / CHECKPOINTS).glob("step_*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Save and resume


def save_due(cfg: RunConfig, step: int) -> bool:
    every = cfg.checkpoint.every_steps
    return every > 0 and (step % every == 0 or step == cfg.train.steps)


def save(run_dir: Path, cfg: RunConfig, learners, state: TrainerState, ahead: tuple | None = None) -> Path:
    """Write the checkpoint of `state.step` atomically, then drop all but the newest keep_last.
    `ahead`: an overlapped run's next-step rollouts as the loop holds them (its result, the
    weight version they were sampled with), restored by `resume`."""
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{state.step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    ahead_bytes = None if ahead is None else pickle.dumps(ahead)
    try:
        (tmp / "learner").mkdir(parents=True)
        learners.save_checkpoint(str(tmp / "learner"))
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "config.yaml").write_text(cfg.to_yaml())
        if ahead_bytes is not None:
            (tmp / AHEAD_FILE).write_bytes(ahead_bytes)
        (tmp / STATE_FILE).write_text(json.dumps({**asdict(state), "config_hash": config_hash(cfg)}, indent=1))
        _fsync_tree(tmp)
    except Exception as e:
        # A partial directory is never taken for a checkpoint (only step_<digits> count); it goes
        # now, so that the space it took is free again and the last complete checkpoint stays newest.
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(_write_failure(Path(run_dir), final, state.step, e, learners, len(ahead_bytes or b""),
                                                  cfg.checkpoint.keep_last)) from e
    os.rename(tmp, final)
    _fsync(root)
    for old in complete_checkpoints(run_dir)[: -cfg.checkpoint.keep_last]:
        _remove(old)
    return final


def _needed_bytes(learners, ahead_bytes: int) -> int | None:
    """The estimated size of one checkpoint (None when the learners cannot say: test stand-ins)."""
    measure = getattr(learners, "checkpoint_bytes", None)
    if measure is None:
        return None
    try:  # a rank stuck in the failed save's collective must not hang the report
        learner_bytes = measure(timeout_s=30)
    except Exception:
        return None
    return learner_bytes + ahead_bytes + 64 * 1024  # + the driver's RNG states, config and counters


def _is_out_of_space(error: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain (Ray wraps a learner's error; torch.save reports a
    full disk as PytorchStreamWriter's "file write failed")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "file write failed" in str(error):
            return True
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return False


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _write_failure(run_dir: Path, final: Path, step: int, error: Exception, learners, ahead_bytes: int, keep_last: int) -> str:
    """One paragraph: what was being written, where, how much space it needs and has, and what is left."""
    need = _needed_bytes(learners, ahead_bytes)
    where = next(p for p in (final.parent, *final.parent.parents) if p.exists())
    usage = shutil.disk_usage(where)  # the partial write already removed
    full = _is_out_of_space(error) or (need is not None and usage.free < need)
    size = f"about {_mb(need)}" if need is not None else "an unknown amount"
    cause = str(error).splitlines()[0] if str(error) else type(error).__name__
    what = (
        f"Could not write the checkpoint of step {step} (learner weights, optimizer and RNG states) into {final}"
    )
    if full:
        return (
            f"{what}: the file system is out of space. A checkpoint needs {size} (the trained weights with "
            f"AdamW's float32 master copy and moments, 12 bytes a parameter more, estimated from the state "
            f"being saved), and {where} has {_mb(usage.free)} free of {_mb(usage.total)}; at "
            f"checkpoint.keep_last={keep_last} the run holds up to {keep_last + 1} at once (the kept ones and "
            f"the one being written). The partial write was removed. {checkpoint_note(run_dir)} Free space there or move "
            "the run directory to a larger file system before resuming, lower checkpoint.keep_last, or "
            "set checkpoint.every_steps=0 to train without checkpoints."
        )
    return (
        f"{what}: {type(error).__name__}: {cause}. The partial write was removed. {checkpoint_note(run_dir)} "
        f"Fix what stops writing there (a checkpoint needs {size}), then resume."
    )


def _drop_steps_after(path: Path, step: int) -> None:
    """Keep the JSON lines of steps <= step: the steps after it are about to run again. A line cut
    short by a kill does not parse and goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def resume(run_dir: Path, cfg: RunConfig, learners, push, stream) -> tuple[TrainerState, tuple | None]:
    """Bring a freshly built run (learners, engines, prompt stream, driver RNG) to the state of the
    newest complete checkpoint in run_dir (`push()` gives the engines the learner's weights, through
    the run's transport); returns its counters and the rollouts it saved ahead
    (None when it has none). Records of the steps after it (a killed run's partial progress) are
    dropped from metrics.jsonl and reward_failures.jsonl."""
    remove_incomplete(run_dir)
    checkpoint = newest(run_dir)
    if checkpoint is None:
        raise CheckpointError(f"Cannot resume {run_dir}: it has no complete checkpoint in {Path(run_dir) / CHECKPOINTS}.")
    _check_same_run(cfg, checkpoint, json.loads((checkpoint / STATE_FILE).read_text())["config_hash"])
    state = read_state(checkpoint)
    learners.load_checkpoint(str(checkpoint / "learner"))
    push()
    stream.position = state.data_position
    set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=False))
    for name in ("metrics.jsonl", "reward_failures.jsonl"):
        _drop_steps_after(Path(run_dir) / name, state.step)
    ahead = checkpoint / AHEAD_FILE
    print(f"[checkpoint] resumed from {checkpoint} (step {state.step})", flush=True)
    return state, (pickle.loads(ahead.read_bytes()) if ahead.exists() else None)
