"""Weight-sync cost per step, both backends, on the default recipe.

    PYTHONPATH=. python scripts/bench_sync.py [--steps 2] [--recipe grpo_smollm2] [key=value ...]

Runs the recipe for a few steps with sync.backend=object_store, then collective (each a real
`rl.launch` in its own process, so each has a fresh Ray cluster), and prints per step: the push's
seconds, the whole sync phase (push + the after-push log-prob check) and their share of the step.
Writes bench_results/sync.json and bench_results/sync.png. The target is a push at most 2% of the step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("object_store", "collective")
PHASES = ("time/generation", "time/reward", "time/learner", "time/sync")


def run(backend: str, args: argparse.Namespace, out: Path) -> list[dict]:
    overrides = [
        f"train.steps={args.steps}", f"sync.backend={backend}", "train.save_final=false",
        f"tracking.output_dir={out}", f"tracking.run_name={backend}", *args.overrides,
    ]
    print(f"[{time.strftime('%H:%M:%S')}] {backend}: {args.recipe}, {args.steps} steps ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "rl.launch", f"recipe={args.recipe}", *overrides], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{backend} run failed (exit {proc.returncode})")
    return [json.loads(line) for line in (out / backend / "metrics.jsonl").read_text().splitlines()]


def summarize(backend: str, records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        step_s = sum(r[k] for k in PHASES)
        push_s = sum(v for k, v in r.items() if k.startswith("time/sync_") and k.endswith("_s"))
        rows.append(dict(
            backend=backend, step=r["step"], step_s=step_s, push_s=push_s, sync_phase_s=r["time/sync"],
            push_share=push_s / step_s, sync_phase_share=r["time/sync"] / step_s,
            sync_mb=r.get("sync_bytes", 0) / 2**20, logprob_gap=r.get("logprob_gap"),
        ))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['backend']}\nstep {r['step']}" for r in rows]
    ax.bar(labels, [100 * r["push_share"] for r in rows], label="push")
    ax.bar(labels, [100 * (r["sync_phase_share"] - r["push_share"]) for r in rows],
           bottom=[100 * r["push_share"] for r in rows], label="log-prob check")
    ax.axhline(2, color="k", ls="--", lw=1, label="target 2%")
    ax.set_ylabel("% of the step")
    ax.set_title("weight sync share of a training step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--recipe", default="grpo_smollm2")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in BACKENDS:
            rows += summarize(backend, run(backend, args, Path(tmp)))
    print(f"{'backend':<13} {'step':>4} {'step s':>8} {'push s':>7} {'push %':>7} {'sync+check s':>12} {'sync %':>7} {'MB':>6} {'gap':>9}")
    for r in rows:
        print(f"{r['backend']:<13} {r['step']:>4} {r['step_s']:>8.1f} {r['push_s']:>7.2f} {100 * r['push_share']:>6.2f}% "
              f"{r['sync_phase_s']:>12.2f} {100 * r['sync_phase_share']:>6.2f}% {r['sync_mb']:>6.0f} {r['logprob_gap']:>9.2g}")
    out = ROOT / "bench_results"
    out.mkdir(exist_ok=True)
    meta = dict(recipe=args.recipe, steps=args.steps, overrides=args.overrides, machine="2-core CPU, shared with other jobs")
    (out / "sync.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    plot(rows, out / "sync.png")
    print(f"wrote {out / 'sync.json'} and {out / 'sync.png'}")


if __name__ == "__main__":
    main()
