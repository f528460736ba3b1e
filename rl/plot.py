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
    panels = [(title, [n for n in names if any(n in r for r in records)]) for title, names in PANELS]
    panels = [(title, names) for title, names in panels if names]
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 2.4 * len(panels)), squeeze=False, sharex="col")
    steps = [r["step"] for r in records]
    tokens = [r.get("cumulative_rollout_tokens", math.nan) for r in records]
    for row, (title, names) in enumerate(panels):
        for col, xs in enumerate((steps, tokens)):
            ax = axes[row][col]
            for name in names:
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
