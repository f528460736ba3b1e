"""`python -m rl.launch recipe=NAME key=value ... [--print-config] [--dry-run]`
`python -m rl.launch resume=RUN_DIR [key=value ...]`

Every problem found before training (a misspelled key, a bad value, a missing recipe, model or
dataset) is reported as one paragraph and exit code 2, before any heavy work starts.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rl.cli import UsageError, parse_command_line, tool_arguments
from rl.core.layers import describe

USAGE = """usage: python -m rl.launch recipe=NAME [key=value ...] [--print-config] [--dry-run] [--verbose]
       python -m rl.launch resume=RUN_DIR [key=value ...] [--print-config] [--dry-run] [--verbose]

  recipe=NAME      a file recipes/NAME.yaml (or a path to a .yaml file)
  key=value        override any option by its dotted name, e.g. train.steps=5 grpo.kl_coef=0.01
  resume=RUN_DIR   continue the run in RUN_DIR from its newest complete checkpoint (see
                   checkpoint.every_steps), with its config.yaml; steps after that checkpoint
                   run again exactly as they first did and replace their records. Overrides
                   may only change what leaves the math alone: train.steps (to extend a run),
                   train.save_final, checkpoint.*, tracking.wandb, tracking.tensorboard,
                   eval.every_steps, sync.check_sequences, reward.workers, rollout.max_restarts,
                   rollout.timeout_s, train.max_skipped_updates, train.stop_on_collapse,
                   checkpoint.on_interrupt
  --print-config   print the resolved config, then run (add --dry-run to stop there)
  --dry-run        resolve and validate everything (config, algorithm, rewards, data source,
                   model path) without loading models or downloading anything, then exit;
                   every local path named (data files, model folder, reward files) must
                   exist, and a local data file (or local copy) is read and every row checked
                   as the run will (valid JSON, a question and a gold answer, not empty); a
                   missing data.local_dir is reported (the hub stands in for it), and with
                   HF_HUB_OFFLINE=1 set it is an error
  --verbose        show the engines' and learners' own logs on the console (tracking.verbose);
                   otherwise they go to RUN_DIR/logs

Ctrl-C or SIGTERM stops the run after the current step, saves a checkpoint (unless
checkpoint.on_interrupt=false) and prints the resume= command; exit code 130 / 143.
A run stopped by a divergence guard or by engines failing past rollout.max_restarts exits 1.

The library's layers, from the bottom up (rl/core/layers.py; tests/unit/test_architecture.py
holds every module to them, imports inside functions included):
""" + describe()


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _validate(cfg) -> list[str]:
    """Resolve every name in the config now, so typos cost seconds, not a started cluster; returns
    notes worth showing (a local data copy missing, the hub standing in, a check that will not run)."""
    from rl.algorithms import build_algorithm
    from rl.core.contracts import unchecked
    from rl.data import check_local_paths
    from rl.models import check_model_path
    from rewards import get_reward
    from rewards.scoring import correctness_index

    algorithm = build_algorithm(cfg)
    for spec in cfg.reward.functions:
        get_reward(spec.name)
    check_model_path(cfg.model.path)
    notes = check_local_paths(cfg.data)
    if correctness_index(cfg.reward.functions) is None:
        notes.append("no reward in reward.functions is the correctness signal, so `accuracy` is not logged: mark the "
                     "reward that grades answers `correctness: true` to log it.")
    notes += [f"algorithm {cfg.algorithm}: {line}" for line in unchecked(algorithm.provides())]
    return notes


def _check_data(cfg) -> str | None:
    """The dry run's reading of a local training set (rl.data.check_local_data): what was checked."""
    from rl.data import check_local_data

    return check_local_data(cfg.data, cfg.seed)


def main(argv: list[str] | None = None) -> int:
    argv = tool_arguments(argv, USAGE)
    if argv is None:
        return 0
    if not argv:
        print(USAGE)
        return 2
    try:
        # Every key but recipe= and resume= is a config override, checked by the config loader.
        line = parse_command_line(argv, USAGE, ("recipe", "resume"), ("--print-config", "--dry-run", "--verbose"),
                                  config_override=lambda key: True)
    except UsageError as e:
        _fail(str(e))
    flags = line.switches
    recipe = line.options.get("recipe")
    resume_dir = Path(line.options["resume"]) if "resume" in line.options else None
    if recipe is not None and resume_dir is not None:
        _fail("give recipe= or resume=, not both: a resumed run keeps the config in its directory.")
    cfg = _checked_config(recipe, resume_dir, line.overrides + (["tracking.verbose=true"] if "--verbose" in flags else []),
                          "--dry-run" in flags)
    if "--print-config" in flags:
        print(cfg.to_yaml())
    if "--dry-run" in flags:
        return 0
    return _run(cfg, resume_dir)


def _checked_config(recipe: str | None, resume_dir: Path | None, overrides: list[str], dry_run: bool):
    """The run's config, every name in it resolved (and with a dry run the local data read); a
    problem is one paragraph and exit 2."""
    from rl.config import ConfigError, load_config
    from rl.data import DataError
    from rl.loop import checkpoint
    from rl.models import ModelError
    from rewards.scoring import RewardError

    user_errors = (ConfigError, ModelError, DataError, RewardError, KeyError, ImportError, AttributeError)
    try:
        cfg = checkpoint.resume_config(resume_dir, overrides) if resume_dir else load_config(recipe, overrides)
        notes = _validate(cfg)
        # --dry-run validates everything: a local training set is read as the run will read it.
        data_checked = _check_data(cfg) if dry_run else None
    except user_errors as e:
        _fail(str(e.args[0]) if isinstance(e, KeyError) else str(e))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if dry_run:
        print(f"config OK: recipe {cfg.recipe}, algorithm {cfg.algorithm}, model {cfg.model.path}"
              + (f"; {data_checked}" if data_checked else ""), file=sys.stderr)
    return cfg


def _run(cfg, resume_dir: Path | None) -> int:
    """Train in the run directory; the exit code (0, 1 when a guard stopped it, 130/143 on a signal)."""
    from rl.data import DataError
    from rl.loop import checkpoint
    from rl.loop.guards import GracefulStop
    from rl.loop.local_cluster import ClusterError
    from rl.loop.placement import PlacementError
    from rl.loop.stopped import RunStopped
    from rl.loop.trainer import train
    from rl.models import ModelError
    from rl.sync.check import WeightSyncError
    from rewards.scoring import RewardError
    from rollouts.pool import RolloutEngineError

    run_name = cfg.tracking.run_name or f"{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = resume_dir or Path(cfg.tracking.output_dir) / run_name
    if resume_dir is None and checkpoint.newest(run_dir) is not None:
        _fail(f"{run_dir} holds checkpoints of an earlier run: continue it with resume={run_dir}, or set another tracking.run_name.")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Atomic: a resume reads it back, and the run may be killed at any moment.
    checkpoint.atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    print(
        f"run directory: {run_dir}\n{cfg.algorithm} on {cfg.data.train} with {cfg.model.path}, {cfg.train.steps} steps; "
        f"engine and learner logs in {run_dir / 'logs'}" + ("" if cfg.tracking.verbose else " (--verbose to show them)"),
        file=sys.stderr,
    )
    started = time.time()
    stop = GracefulStop(announce=lambda message: print(f"\n{message}", file=sys.stderr, flush=True))
    try:
        with stop:
            metrics = train(cfg, run_dir, resume=resume_dir is not None, stop=stop)
    except (ModelError, DataError, RewardError, checkpoint.CheckpointError, WeightSyncError, RolloutEngineError,
            ClusterError, PlacementError) as e:
        # Errors that name their cause and fix: one paragraph, not a traceback through Ray.
        _fail(str(e))
    except RunStopped as e:
        print(f"stopped: {e}" if e.exit_code == 1 else str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, wherever the run was
        print(f"interrupted: stopped at once, nothing saved now. {checkpoint.checkpoint_note(run_dir)}", file=sys.stderr)
        return 130
    from rl.plot import held_out_summary

    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("reward", "accuracy") if k in metrics)
    held_out = held_out_summary(run_dir)
    print(
        f"done in {(time.time() - started) / 60:.1f} min{': last step ' + summary if summary else ''}"
        f"{'; ' + held_out if held_out else ''}. Metrics in "
        f"{run_dir / 'metrics.jsonl'}, curves in {run_dir / 'curves.png'}"
        + (f", final model in {run_dir / 'final'}" if cfg.train.save_final else ""),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
