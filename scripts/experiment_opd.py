"""On-policy distillation from an SFT teacher against GRPO: accuracy against rollout tokens (CPU, offline).

    PYTHONPATH=. python scripts/experiment_opd.py [--out /tmp/opd_experiment] [--seeds 0,1,2] [--compare-only]

The student is the built model `tiny-qwen3-addition` (a tiny Qwen3 warmed up to partial accuracy on
single-digit `a+b=`); the teacher is `tiny-qwen3-addition-sft`, the same model after `python -m
rl.sft` on the training pairs only (rl.demo.tiny). Half of the 100 pairs are held out from both.
Methods, each from the same student, one `python -m rl.launch` per run:

  opd             recipe opd_tiny: the teacher sees the student's prompt (reverse KL, sampled rollouts)
  opsd_sft        the same with the teacher shown the reference solution (opsd.teacher.privileged=true)
  grpo, grpo_lr3e-3   GRPO, group 8, at two learning rates (tests/integration/test_grpo_end_to_end.py's
                  settings, as in scripts/experiment_addition.py)

One evaluation protocol for all (the recipe's `eval`: greedy, 4 tokens, math-verify) on the held-out
pairs (`eval/synthetic:addition_pairs/pass@1`) and on the training pairs
(`eval/synthetic:addition_train_pairs/pass@1`). Then `python -m rl.compare` per set, with the target
at GRPO's best mean accuracy: how many rollout tokens each method needs to reach it. Finished runs
are kept (marked `done`), so an interrupted experiment continues.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from experiment_addition import launch, teacher_diagnostic  # noqa: E402

METRICS = {"heldout": "eval/synthetic:addition_pairs/pass@1", "train_pairs": "eval/synthetic:addition_train_pairs/pass@1"}
GRPO = [  # the default config's GRPO on the recipe's model, data and evaluation
    "plugins=[rl.demo.tiny]", "model.path=tiny-qwen3-addition", "data.train=synthetic:addition_pairs",
    "data.prompt_format=plain", "data.max_prompt_tokens=16", "rollout.max_tokens=4", "rollout.kv_cache_gb=0.25",
    "grpo.group_size=8", "train.steps=30", "train.prompts_per_step=64", "learner.micro_batch_size=256",
    "eval.at_start=true", "eval.every_steps=3", "eval.benchmarks=[synthetic:addition_pairs,synthetic:addition_train_pairs]",
    "eval.k=1", "eval.max_tokens=4", "eval.prompt_format=plain", "checkpoint.every_steps=0", "train.save_final=false",
]
PLAN = [  # (label, overrides); the recipe must come first on a command line
    ("opd", ["recipe=opd_tiny"]),
    ("opsd_sft", ["recipe=opd_tiny", "opsd.teacher.privileged=true"]),
    ("grpo", [*GRPO, "learner.lr=1e-3"]),
    ("grpo_lr3e-3", [*GRPO, "learner.lr=3e-3"]),
]


def mean_curve(run_dirs: list[Path], metric: str) -> list[tuple[float, float]]:
    """(mean cumulative rollout tokens, mean accuracy) at each evaluation the runs share."""
    curves = []
    for run in run_dirs:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        curves.append([(x.get("cumulative_rollout_tokens", 0), x[metric]) for x in lines if metric in x])
    n = min(map(len, curves))
    return [(sum(c[i][0] for c in curves) / len(curves), sum(c[i][1] for c in curves) / len(curves)) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/opd_experiment")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--compare-only", action="store_true", help="only redo the comparison of existing runs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    import rl.demo.tiny as tiny
    from rl.models import resolve_model_path

    student, teacher = resolve_model_path("tiny-qwen3-addition"), resolve_model_path("tiny-qwen3-addition-sft")
    train_pairs, heldout_pairs = tiny.addition_pair_split()
    diagnostic = {
        name: {subset: teacher_diagnostic(Path(path), tiny.addition_pair_rows(pairs))
               for subset, pairs in (("heldout", heldout_pairs), ("train_pairs", train_pairs))}
        for name, path in (("student", student), ("teacher", teacher))
    }
    (out / "models.json").write_text(json.dumps(diagnostic, indent=2))
    print("greedy accuracy before training:", json.dumps(diagnostic), flush=True)

    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[Path]] = {}
    times = {}
    for label, extra in PLAN:
        for seed in seeds:
            name = f"{label}_seed{seed}"
            run_dir = out / "runs" / name
            if not args.compare_only and not (run_dir / "done").exists():
                if run_dir.exists():
                    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                times[name] = launch([*extra, f"tracking.output_dir={out / 'runs'}", f"seed={seed}",
                                      f"tracking.run_name={name}"], out / f"{name}.log")
                (run_dir / "done").write_text(f"{times[name]:.0f} s\n")
                print(f"{name}: {times[name]:.0f} s", flush=True)
            runs.setdefault(label, []).append(run_dir)
    if times:
        times_file = out / "run_times.json"
        previous = json.loads(times_file.read_text()) if times_file.exists() else {}
        times_file.write_text(json.dumps({**previous, **times}, indent=2))

    summary = {"models": diagnostic, "seeds": seeds, "sets": {}}
    for subset, metric in METRICS.items():
        curves = {label: mean_curve(dirs, metric) for label, dirs in runs.items()}
        grpo_best = max(acc for label, curve in curves.items() if label.startswith("grpo") for _, acc in curve)
        summary["sets"][subset] = {"metric": metric, "grpo_best": grpo_best, "mean_curves": curves}
        cmd = [sys.executable, "-m", "rl.compare", "runs=" + ",".join(str(d) for dirs in runs.values() for d in dirs),
               f"metric={metric}", "labels=" + ",".join(label for label, dirs in runs.items() for _ in dirs),
               f"target={grpo_best:.4f}", f"out={out / 'compare' / subset}"]
        subprocess.run(cmd, cwd=ROOT, check=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"total {time.time() - t0:.0f} s; comparison in {out / 'compare'}", flush=True)


if __name__ == "__main__":
    main()
