"""When do diffu-GRPO's truncated importance weights fire? (issue 26 part 2)

    PYTHONPATH=. python scripts/experiment_is_weights.py [--out /tmp/is_weights] [--steps 12] [--lr 3e-3]

Runs recipe diffu_grpo_tiny with `diffu_grpo.importance_sampling=token` (cap 2) under four conditions:
- plain: the release's sampler, generation and training taking turns (on-policy);
- parallel: Fast-dLLM's parallel decoding (rollout.diffusion.threshold=0.9), on-policy: the sampler is
  no longer the estimator's policy, but the engine reports the estimator on the final sequence;
- stale: the plain sampler one weight version behind (train.max_staleness=1: the engines generate the
  next batch while the learner trains);
- stale_parallel: both.
For each, per step: the importance weights' mean, the share of tokens whose ratio is beyond the cap
(`mismatch/is_capped_fraction`: truncated), the engine-vs-learner log-prob gap and the batch's age.
Writes results.json, a table on stdout and is_weights.png.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARALLEL = ["rollout.diffusion.threshold=0.9"]
STALE = ["train.max_staleness=1", "ray.placement=split", "reward.workers=1"]
CONDITIONS = {"plain": [], "parallel": PARALLEL, "stale": STALE, "stale_parallel": STALE + PARALLEL}
METRICS = ("mismatch/is_weight_mean", "mismatch/is_capped_fraction", "mismatch/logprob_gap_mean",
           "mismatch/logprob_gap_max", "batch_age")


def run(out: Path, name: str, extra: list[str], steps: int, lr: str) -> list[dict]:
    run_dir = out / name
    if not (run_dir / "done").exists():
        args = ["recipe=diffu_grpo_tiny", "diffu_grpo.importance_sampling=token", f"learner.lr={lr}",
                f"train.steps={steps}", "train.save_final=false", f"tracking.output_dir={out}", f"tracking.run_name={name}",
                *extra]
        start = time.time()
        with (out / f"{name}.log").open("w") as log:
            proc = subprocess.run([sys.executable, "-m", "rl.launch", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see {out / f'{name}.log'}")
        (run_dir / "done").write_text(f"{time.time() - start:.0f} s\n")
        print(f"[is_weights] {name}: {time.time() - start:.0f} s", flush=True)
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["step"] > 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/is_weights")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", default="3e-3", help="a rate at which one step moves the policy visibly")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_step = {name: run(out, name, extra, args.steps, args.lr) for name, extra in CONDITIONS.items()}
    summary = {name: {m: {"mean": sum(r.get(m, 0.0) for r in rows) / len(rows), "max": max(r.get(m, 0.0) for r in rows),
                          "per_step": [r.get(m) for r in rows]} for m in METRICS}
               for name, rows in per_step.items()}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, s in summary.items():
        steps = range(1, len(s["batch_age"]["per_step"]) + 1)
        axes[0].plot(steps, s["mismatch/is_capped_fraction"]["per_step"], marker="o", label=name)
        axes[1].plot(steps, s["mismatch/is_weight_mean"]["per_step"], marker="o", label=name)
    axes[0].set(xlabel="step", ylabel="share of tokens with ratio > cap 2", title="Truncated importance weights firing")
    axes[1].set(xlabel="step", ylabel="mean truncated weight", title="Mean importance weight")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "is_weights.png", dpi=120)

    print("| condition | mean weight | capped share (mean / max) | gap mean | gap max (largest) | batch age |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, s in summary.items():
        print(f"| {name} | {s['mismatch/is_weight_mean']['mean']:.4f} | {s['mismatch/is_capped_fraction']['mean']:.4f} / "
              f"{s['mismatch/is_capped_fraction']['max']:.4f} | {s['mismatch/logprob_gap_mean']['mean']:.2e} | "
              f"{s['mismatch/logprob_gap_max']['max']:.2e} | {s['batch_age']['mean']:.2f} |")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
