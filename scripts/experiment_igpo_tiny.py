"""IGPO versus diffu-GRPO on the tiny masked-diffusion chain-arithmetic task (recipes igpo_tiny, diffu_grpo_tiny),
IGPO with the plain sampler versus IGPO with parallel decoding (`igpo_fast`: rollout.diffusion.threshold=0.9),
IGPO on d1's one-step likelihood estimator versus mc_elbo and coupled (`igpo_mc_elbo`, `igpo_coupled`),
or OPSD from a teacher shown the reference (recipe opsd_tiny_dllm: `opsd_reader`, `opsd_reader_coupled`)
against diffu-GRPO per rollout token.

    PYTHONPATH=. python scripts/experiment_igpo_tiny.py [--out /tmp/igpo_tiny] [--seeds 0,1] [--steps 40]
        [--methods igpo,diffu_grpo | igpo,igpo_fast | igpo,igpo_mc_elbo,igpo_coupled]

Both methods start from the same built model (`tiny-dllm-chain-addition`, SFT-warmed to about 30%
accuracy) and see the same prompts at every step for a given seed (the data order depends on the
seed only), so their per-step all-wrong fractions are paired. Each run evaluates greedy accuracy
on 256 held-out problems (the synthetic test split) at the start and every 10 steps. Writes
results.json, all_wrong.png (all-wrong group fraction per step: IGPO before and after inpainting,
diffu-GRPO) and, through `python -m rl.compare`, accuracy against rollout tokens.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Method name -> (recipe, extra overrides[, steps factor]).
METHODS = {
    "igpo": ("igpo_tiny", []),
    "diffu_grpo": ("diffu_grpo_tiny", []),
    "igpo_fast": ("igpo_tiny", ["rollout.diffusion.threshold=0.9"]),  # Fast-dLLM's parallel decoding
    # other likelihood estimators (rollouts.estimators) than d1's one_step, at 3 forwards each
    "igpo_mc_elbo": ("igpo_tiny", ["igpo.estimator=mc_elbo", "igpo.estimator_samples=3"]),
    "igpo_coupled": ("igpo_tiny", ["igpo.estimator=coupled", "igpo.estimator_samples=1"]),
    # OPSD with a teacher shown the reference trace (issue 27 part 3): one rollout a prompt, so 4x the
    # steps still spend half of diffu-GRPO's rollout tokens; evaluated every 20 steps (30k tokens).
    "opsd_reader": ("opsd_tiny_dllm", ["eval.every_steps=20"], 4),
    "opsd_reader_coupled": ("opsd_tiny_dllm", ["eval.every_steps=20", "opsd.estimator=coupled"], 4),
}
EVAL_METRIC = "eval/synthetic:chain_addition/pass@1"


def launch(out: Path, method: str, seed: int, steps: int) -> Path:
    name = f"{method}_seed{seed}"
    run_dir = out / name
    if (run_dir / "final").exists():
        print(f"[experiment] {name}: done before, reusing", flush=True)
        return run_dir
    recipe, extra, *factor = METHODS[method]
    args = [
        f"recipe={recipe}", f"seed={seed}", f"train.steps={steps * (factor or [1])[0]}", "learner.lr=3e-4",
        "train.prompts_per_step=64", "eval.every_steps=10", *extra, "eval.at_start=true",
        "eval.benchmarks=[synthetic:chain_addition]", "eval.limit=256",
        f"tracking.output_dir={out}", f"tracking.run_name={name}",
    ]
    start = time.time()
    with (out / f"{name}.log").open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "rl.launch", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {out / f'{name}.log'}")
    print(f"[experiment] {name}: {time.time() - start:.0f} s", flush=True)
    return run_dir


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def summarise(runs: dict[tuple[str, int], Path]) -> dict:
    out = {}
    for (method, seed), run_dir in runs.items():
        steps = [r for r in records(run_dir) if r["step"] > 0]
        evals = [(r["step"], r[EVAL_METRIC]) for r in records(run_dir) if EVAL_METRIC in r]
        acc = [r["accuracy"] for r in steps]
        nan = float("nan")  # OPSD has no groups
        out[f"{method}_seed{seed}"] = {
            "all_wrong_before": mean(r.get("igpo/all_wrong_fraction_before", nan) for r in steps),
            "all_wrong_after": mean(r.get("igpo/all_wrong_fraction_after", nan) for r in steps),
            "replaced_per_step": mean(r.get("igpo/replaced", nan) for r in steps),
            "sampled_accuracy_first5": mean(acc[:5]),
            "sampled_accuracy_last5": mean(acc[-5:]),
            "greedy_heldout": evals,
            "rollout_tokens": steps[-1]["cumulative_rollout_tokens"],
            "generation_s_per_step": mean(r["time/generation"] for r in steps),
            "calls_per_block": mean(r.get("rollout/diffusion_calls_per_block", float("nan")) for r in steps),
            "per_step": {k: [r.get(k, nan) for r in steps] for k in ("accuracy", "igpo/all_wrong_fraction_before",
                                                                    "igpo/all_wrong_fraction_after", "cumulative_rollout_tokens")},
        }
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"igpo": "tab:blue", "diffu_grpo": "tab:orange", "igpo_fast": "tab:green", "igpo_mc_elbo": "tab:red",
              "igpo_coupled": "tab:purple", "opsd_reader": "tab:brown", "opsd_reader_coupled": "tab:pink"}
    for name, s in summary.items():
        method = name.rsplit("_seed", 1)[0]
        steps = range(1, len(s["per_step"]["accuracy"]) + 1)
        axes[0].plot(steps, s["per_step"]["igpo/all_wrong_fraction_after"], color=colors[method], alpha=0.8,
                     label=f"{name} (trained groups)")
        if method.startswith("igpo"):
            axes[0].plot(steps, s["per_step"]["igpo/all_wrong_fraction_before"], color=colors[method], alpha=0.4,
                         linestyle="--", label=f"{name} (before inpainting)")
        x, y = zip(*s["greedy_heldout"])
        axes[1].plot(x, y, marker="o", color=colors[method], alpha=0.8, label=name)
    axes[0].set(xlabel="step", ylabel="fraction of all-wrong groups", title="All-wrong groups (G = 8)")
    axes[1].set(xlabel="step", ylabel="greedy accuracy, 256 held-out problems", title="Held-out accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/igpo_tiny")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--methods", default="igpo,diffu_grpo", help=f"two or more of {', '.join(METHODS)}")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}: choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {(m, s): launch(out, m, s, args.steps) for s in seeds for m in methods}
    summary = summarise(runs)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "all_wrong.png")
    labels = ",".join(m for m, _ in runs)  # both IGPO variants are algorithm igpo: label them by method
    subprocess.run([sys.executable, "-m", "rl.compare", "runs=" + ",".join(map(str, runs.values())), f"metric={EVAL_METRIC}",
                    f"labels={labels}", f"out={out}"], cwd=ROOT, check=True)
    print("| run | all-wrong before | all-wrong trained | replaced/step | sampled acc first 5 -> last 5 | greedy held-out "
          "| calls/block | generation s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in summary.items():
        greedy = " -> ".join(f"{v:.3f}" for _, v in s["greedy_heldout"])
        print(f"| {name} | {s['all_wrong_before']:.3f} | {s['all_wrong_after']:.3f} | {s['replaced_per_step']:.1f} | "
              f"{s['sampled_accuracy_first5']:.3f} -> {s['sampled_accuracy_last5']:.3f} | {greedy} | "
              f"{s['calls_per_block']:.2f} | {s['generation_s_per_step']:.1f} |")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
