"""GRPO versus OPSD on GSM8K with SmolLM2-135M-Instruct at an equal rollout-token budget (CPU).

    PYTHONPATH=. python scripts/experiment_gsm8k.py [--out /tmp/gsm8k_experiment] [--seeds 0]

Both methods train on the same 32 GSM8K training problems (the first 32 rows of
../shared/data/gsm8k/train.jsonl) from the same SmolLM2-135M-Instruct, at the same learning rate
(1e-5, the opsd_smollm2 recipe's) and completion limit (192 tokens); each keeps its own recipe's
sampling (GRPO T=1.0; OPSD the paper's T=1.1, top-p 0.95, top-k 20). GRPO samples a group of 8
for 4 problems a step; OPSD one rollout for 8 problems a step, graded by the frozen initial model
shown the reference solution. The step counts give similar budgets (seed 0: GRPO 28.8k rollout
tokens, OPSD 24.5k).

Evaluation, greedy through the trainer's own periodic evaluation: the first 100 GSM8K test
problems (`eval/gsm8k/...`, held out) and the 32 training problems themselves (a local set has to
sit under a benchmark name, so `eval/math500/...` here means THE 32 TRAINING PROBLEMS). Runs
that already finished (marked `done` by this script) are kept, so an interrupted
experiment continues where it stopped; `--compare-only` redoes only the rl.compare step.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
TRAIN_PROBLEMS, HELDOUT_PROBLEMS = 32, 100
MAX_TOKENS, LR = 192, "1e-5"
# (label, recipe, overrides). Measured per step: GRPO ~5.7k rollout tokens (32 completions, most
# truncated at 192), OPSD ~1.2k (8 completions).
PLAN = [
    ("grpo", "grpo_smollm2", ["grpo.group_size=8", "train.prompts_per_step=4", "train.steps=5", "eval.every_steps=2"]),
    ("opsd", "opsd_smollm2", ["train.prompts_per_step=8", "train.steps=20", "eval.every_steps=5"]),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/gsm8k_experiment")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--compare-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    t0 = time.time()
    train_rows = (GSM8K / "train.jsonl").read_text().splitlines()[:TRAIN_PROBLEMS]
    heldout_rows = (GSM8K / "test.jsonl").read_text().splitlines()[:HELDOUT_PROBLEMS]
    for sub, rows in (("gsm8k", heldout_rows), ("math500", train_rows)):
        (out / "evalsets" / sub).mkdir(parents=True, exist_ok=True)
        (out / "evalsets" / sub / "test.jsonl").write_text("\n".join(rows) + "\n")
    train = out / "train.jsonl"
    train.write_text("\n".join(train_rows) + "\n")

    common = [
        f"data.train={train}", f"rollout.max_tokens={MAX_TOKENS}", f"learner.lr={LR}",
        "eval.at_start=true", f"eval.local_dir={out / 'evalsets'}", "eval.benchmarks=[gsm8k,math500]",
        f"eval.max_tokens={MAX_TOKENS}", f"tracking.output_dir={out / 'runs'}", "checkpoint.every_steps=0",
        "train.save_final=false",
    ]
    run_dirs, labels, times = [], [], {}
    for label, recipe, extra in PLAN:
        for seed in [int(s) for s in args.seeds.split(",")]:
            name = f"{label}_seed{seed}"
            run_dir = out / "runs" / name
            run_dirs.append(str(run_dir))
            labels.append(label)
            if args.compare_only or (run_dir / "done").exists():
                continue
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            start = time.time()
            cmd = [sys.executable, "-m", "rl.launch", f"recipe={recipe}", *common, *extra, f"seed={seed}",
                   f"tracking.run_name={name}"]
            with (out / f"{name}.log").open("w") as log:
                proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}); see {out / f'{name}.log'}")
            times[name] = round(time.time() - start)
            (run_dir / "done").write_text(f"{times[name]} s\n")
            print(f"{name}: {times[name]} s", flush=True)
    if times:
        times_file = out / "run_times.json"
        previous = json.loads(times_file.read_text()) if times_file.exists() else {}
        times_file.write_text(json.dumps({**previous, **times}, indent=2))
    for metric, sub in (("eval/gsm8k/pass@1", "heldout"), ("eval/math500/pass@1", "train_problems")):
        cmd = [sys.executable, "-m", "rl.compare", "runs=" + ",".join(map(str, run_dirs)), f"metric={metric}",
               "labels=" + ",".join(labels), f"out={out / 'compare' / sub}"]
        subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"total {time.time() - t0:.0f} s; comparison in {out / 'compare'}", flush=True)


if __name__ == "__main__":
    main()
