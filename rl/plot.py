"""`python -m rl.plot run=RUN_DIR [out=OUT.png]`: a run's curves as one PNG (default RUN_DIR/curves.png).

Each row is one quantity from RUN_DIR/metrics.jsonl (reward, accuracy, response length, entropy,
KL, the engine/learner log-prob gap, the stage times); the left column plots it against the step,
the right one against cumulative rollout tokens, the cost axis on which methods are compared. The
trainer draws it at the end of every run, stopped runs included.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rl.cli import UsageError, parse_command_line, require, tool_arguments

# (title, metric names drawn in that panel): a panel is left out when the run has none of them.
PANELS = (
    ("reward", ("reward",)),
    ("accuracy", ("accuracy",)),
    ("response length (tokens)", ("response_length",)),
    ("entropy (nats/token)", ("entropy",)),
    ("KL to reference", ("kl",)),
    ("log-prob gap (nats/token)", ("logprob_gap", "mismatch/logprob_gap_mean")),
    ("stage time (s)", ("time/generation", "time/reward", "time/learner", "time/sync")),
)


def read_records(run_dir: Path) -> list[dict]:
    """The training steps' records (step >= 1), the latest record of a step winning."""
    by_step: dict[int, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if record.get("step", 0) >= 1:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def eval_points(run_dir: Path, metric: str = "pass@1") -> dict[str, list[tuple[float, float, float, float]]]:
    """Per `eval/<benchmark>/<metric>` in metrics.jsonl: (step, cumulative rollout tokens, value, standard
    error; 0 for a metric without one) of every evaluation, the one before the first step (step 0) included."""
    points: dict[str, dict[int, tuple]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in record.items():
            if key.startswith("eval/") and key.endswith(f"/{metric}"):
                se = record.get(key + "_se", 0.0)
                points.setdefault(key, {})[record.get("step", 0)] = (
                    record.get("step", 0), record.get("cumulative_rollout_tokens", math.nan), value, se)
    return {key: [by_step[s] for s in sorted(by_step)] for key, by_step in points.items()}


def held_out_summary(run_dir: Path) -> str | None:
    """`held-out gsm8k pass@1 0.050 ± 0.022 before -> 0.060 ± 0.024 after (boxed answers 0.31 -> 0.42)`
    when the run evaluated before its first step and after its last, else None."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if any(k.startswith("eval/") for k in record):
            records[record.get("step", 0)] = record
    if 0 not in records or len(records) < 2:
        return None
    first, last = records[0], records[max(records)]
    parts = []
    for key in sorted(k for k in first if k.endswith("/pass@1") and k in last):
        base = key.removesuffix("pass@1")
        line = (f"held-out {base.split('/')[1]} pass@1 {first[key]:.3f} ± {first.get(base + 'pass@1_se', 0):.3f} "
                f"before -> {last[key]:.3f} ± {last.get(base + 'pass@1_se', 0):.3f} after step {max(records)}")
        if base + "boxed_rate" in first and base + "boxed_rate" in last:
            line += f" (boxed answers {first[base + 'boxed_rate']:.2f} -> {last[base + 'boxed_rate']:.2f})"
        parts.append(line)
    return "; ".join(parts) or None


def draw(run_dir: Path, out: Path | None = None) -> Path:
    """Write the curves of run_dir's metrics.jsonl to `out` (default run_dir/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "curves.png"
    records = read_records(run_dir)
    if not records:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} holds no training step yet: nothing to plot.")
    reward_parts = sorted({k for r in records for k in r if k.startswith("reward/")})  # reward/<function>
    panels = [(title, [n for n in names if any(n in r for r in records)] + (reward_parts if title == "reward" else []))
              for title, names in PANELS]
    panels = [(title, names) for title, names in panels if names]
    evaluations = eval_points(run_dir)
    if evaluations:
        panels.append(("held-out pass@1 (± s.e.)", sorted(evaluations)))
    # What a small model learns first: the answer format (a non-empty \boxed{}, right or wrong).
    boxed = eval_points(run_dir, "boxed_rate")
    if boxed:
        panels.append(("held-out boxed answers", sorted(boxed)))
    evaluations.update(boxed)
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 2.4 * len(panels)), squeeze=False, sharex="col")
    steps = [r["step"] for r in records]
    tokens = [r.get("cumulative_rollout_tokens", math.nan) for r in records]
    for row, (title, names) in enumerate(panels):
        for col, xs in enumerate((steps, tokens)):
            ax = axes[row][col]
            for name in names:
                if name in evaluations:  # evaluation points, the one before the first step included
                    points = evaluations[name]
                    ax.errorbar([p[col] for p in points], [p[2] for p in points], yerr=[p[3] for p in points],
                                marker="o", markersize=3, capsize=3, label=name)
                    continue
                ys = [r.get(name, math.nan) for r in records]
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
            ax.set_ylabel(title if col == 0 else "")
            ax.grid(alpha=0.3)
            if len(names) > 1:
                ax.legend(fontsize=7)
    axes[-1][0].set_xlabel("step")
    axes[-1][1].set_xlabel("cumulative rollout tokens")
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


USAGE = "usage: " + __doc__.splitlines()[0].split("`")[1]


def main(argv: list[str] | None = None) -> int:
    argv = tool_arguments(argv, USAGE)
    if argv is None:
        return 0
    try:
        line = parse_command_line(argv, USAGE, ("run", "out"))
        run_dir = Path(require(line, "run", USAGE))
        if not (run_dir / "metrics.jsonl").exists():
            raise UsageError(f"{run_dir / 'metrics.jsonl'} does not exist: give the run directory of a run.")
        out = draw(run_dir, Path(line.options["out"]) if "out" in line.options else None)
    except ValueError as e:  # UsageError among them
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
