"""Weight-sync cost per step for each transport (object store, gloo broadcast, shared memory), and overlap's step time, on the default recipe.

    PYTHONPATH=. python scripts/bench_sync.py --mode run [--steps 3] [--recipe grpo_smollm2] [key=value ...]
    PYTHONPATH=. python scripts/bench_sync.py --mode push [--repeats 5] [--step-s 32] [--recipe grpo_smollm2]

--mode run: the recipe for --steps steps in split placement, four times (each a real `rl.launch`
in its own process, with a fresh Ray cluster): sync.backend=object_store, collective as a gloo
broadcast (sync.shared_memory=false) and collective through shared memory (the default on one node)
at train.max_staleness=0, then the default at max_staleness=1. Per step: the step's wall time, the push's
seconds, the whole sync phase (push + any after-push check) and their share of the step. Step 1
(start-up, warm-up) is reported but left out of the medians. The last step re-scores sequences after
its push (no next step's rollouts check it, rl.sync.check), the others do not: both are shown.
Writes bench_results/sync.json and sync.png.

--mode push: the recipe's model in its placed learner and engine, without generating or training:
the object store, the gloo broadcast and shared memory push the same weights, in turn, --repeats
times each (side by side, so that the load of a shared machine hits all alike), each push followed
by the after-push re-scoring check on two sequences of the recipe's length (windowed as
sync.check_tokens says), and vLLM's in-place reload alone (the floor). Shares are of --step-s (the
recipe's step on an idle 2-core machine: 32 s, bench_results/vs_trl.json).
Writes bench_results/sync_push.json and sync_push.png.

The target (issues 12, 13): the sync phase at most 2% of the step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine_info  # scripts/machine_info.py: CPU model, vector extensions, cores

ROOT = Path(__file__).resolve().parent.parent
# (name, the run's overrides)
RUNS = (
    ("object_store", ["sync.backend=object_store", "train.max_staleness=0"]),
    ("collective_broadcast", ["sync.backend=collective", "sync.shared_memory=false", "train.max_staleness=0"]),
    ("collective", ["sync.backend=collective", "train.max_staleness=0"]),
    ("collective_overlap", ["sync.backend=collective", "train.max_staleness=1"]),
)


def run(name: str, settings: list[str], args: argparse.Namespace, out: Path) -> list[dict]:
    overrides = [
        f"train.steps={args.steps}", *settings,
        "ray.placement=split", "train.save_final=false", "eval.every_steps=0", "eval.at_start=false",
        f"tracking.output_dir={out}", f"tracking.run_name={name}", *args.overrides,
    ]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {args.recipe}, {args.steps} steps, {' '.join(settings)} ...", flush=True)
    proc = subprocess.run([sys.executable, "-m", "rl.launch", f"recipe={args.recipe}", *overrides], cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} run failed (exit {proc.returncode})")
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def summarize(name: str, records: list[dict], last_step: int) -> list[dict]:
    """Per step: wall seconds since the previous step was logged (step 1: since the run started),
    the push's seconds (the backend's own timers) and the sync phase's (push + check)."""
    rows, previous = [], 0.0
    for r in records:
        step_s, previous = r["wall_time"] - previous, r["wall_time"]
        push_s = sum(v for k, v in r.items() if k.startswith("time/sync_") and k.endswith("_s"))
        rows.append(dict(
            run=name, step=r["step"], step_s=step_s, push_s=push_s, sync_s=r["time/sync"],
            push_share=push_s / step_s, sync_share=r["time/sync"] / step_s, batch_age=r.get("batch_age", 0),
            rescored=r["step"] == last_step, sync_mb=r.get("sync_bytes", 0) / 2**20, logprob_gap=r.get("logprob_gap"),
        ))
    return rows


def medians(rows: list[dict]) -> dict:
    """Per run, medians over the steps after the first: all of them, and the mid-run ones alone."""
    out = {}
    for name, *_ in RUNS:
        kept = [r for r in rows if r["run"] == name and r["step"] > 1]
        mid = [r for r in kept if not r["rescored"]] or kept
        out[name] = dict(
            step_s=statistics.median(r["step_s"] for r in kept),
            sync_s_mid_run=statistics.median(r["sync_s"] for r in mid),
            sync_share_mid_run=statistics.median(r["sync_share"] for r in mid),
            sync_share_all=statistics.median(r["sync_share"] for r in kept),
            push_s=statistics.median(r["push_s"] for r in kept),
        )
    return out


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    labels = [f"{r['run']}\nstep {r['step']}" + (" (last)" if r["rescored"] else "") for r in rows]
    left.bar(labels, [100 * r["push_share"] for r in rows], label="push")
    left.bar(labels, [100 * (r["sync_share"] - r["push_share"]) for r in rows],
             bottom=[100 * r["push_share"] for r in rows], label="after-push check and the rest")
    left.axhline(2, color="k", ls="--", lw=1, label="target 2%")
    left.set_ylabel("% of the step")
    left.set_title("weight sync share of each step (step 1: warm-up)")
    left.tick_params(axis="x", labelsize=7, rotation=60)
    left.legend(fontsize=8)
    names = list(summary)
    right.bar(names, [summary[n]["step_s"] for n in names], color="tab:gray")
    right.set_ylabel("median step seconds (steps >= 2)")
    right.set_title("split placement: max_staleness 0 vs 1")
    right.tick_params(axis="x", labelsize=8, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def push_only(args: argparse.Namespace) -> None:
    import random

    from rl.core.batch import SequenceBatch
    from rl.config import load_config
    from rl.learner.group import LearnerGroup
    from rl.models import resolve_model_path
    from rl.loop.cluster import init_ray, place
    from rl.sync.check import check_weight_sync
    from rl.sync.weight_sync import CollectiveSync, ObjectStoreSync, SharedMemorySync
    from rollouts.pool import RolloutPool

    cfg = load_config(args.recipe, args.overrides)
    path = resolve_model_path(cfg.model.path)
    init_ray(cfg)
    plan = place(cfg)
    pool = RolloutPool("vllm", path, placement=plan, dtype=cfg.model.dtype, timeout_s=1800,
                       max_model_len=cfg.data.max_prompt_tokens + cfg.rollout.max_tokens, kv_cache_gb=cfg.rollout.kv_cache_gb)
    learners = LearnerGroup(path, cfg.learner, cfg.model.dtype, seed=0, total_steps=1, placement=plan)
    rng = random.Random(0)
    prompt, completion = min(300, cfg.data.max_prompt_tokens), cfg.rollout.max_tokens
    check_batch = SequenceBatch(
        input_ids=[[rng.randrange(100, 10000) for _ in range(prompt + completion)] for _ in range(cfg.sync.check_sequences)],
        prompt_lens=[prompt] * cfg.sync.check_sequences,
    )
    backends = {
        "object_store": ObjectStoreSync(pool, learners),
        "broadcast": CollectiveSync(pool, learners, cfg.sync.bucket_mb),
        "shared_memory": SharedMemorySync(pool, learners),
    }
    # The floor both pay: vLLM's own in-place reload of weights already in the engine's process.
    import ray

    state_ref = ray.put(learners.full_state_dict())

    def reload_only(engine):
        state = ray.get(state_ref)
        t0 = time.perf_counter()
        engine.load_weights(state)
        return time.perf_counter() - t0

    rows = []
    for i in range(args.repeats + 1):  # the first round warms up and is not kept
        floor = pool.apply(reload_only)[0]
        print(f"round {i} engine reload alone {floor:6.2f} s", flush=True)
        if i:
            rows.append(dict(backend="reload_only", round=i, push_s=floor, check_s=0.0, push_share=floor / args.step_s,
                             sync_phase_share=floor / args.step_s, sync_mb=0.0, logprob_gap=0.0))
        for name, sync in backends.items():
            t0 = time.perf_counter()
            metrics = sync.push()
            t1 = time.perf_counter()
            gap = check_weight_sync(pool, learners, check_batch, cfg.sync.check_sequences, cfg.sync.max_logprob_gap,
                                    cfg.sync.check_tokens)
            t2 = time.perf_counter()
            print(f"round {i} {name:<13} push {t1 - t0:6.2f} s  check {t2 - t1:5.2f} s  gap {gap['logprob_gap']:.2g}", flush=True)
            if i:
                rows.append(dict(backend=name, round=i, push_s=t1 - t0, check_s=t2 - t1,
                                 push_share=(t1 - t0) / args.step_s, sync_phase_share=(t2 - t0) / args.step_s,
                                 sync_mb=metrics.get("sync_bytes", 0) / 2**20, logprob_gap=gap["logprob_gap"]))
    pool.close()
    learners.close()
    plan.release()
    print(f"{'backend':<13} {'push s (median)':>16} {'% of ' + str(args.step_s) + ' s step':>18} {'check s':>8} {'MB':>6}")
    summary = {}
    for name in ["reload_only", *backends]:
        mine = [r for r in rows if r["backend"] == name]
        med = sorted(r["push_s"] for r in mine)[len(mine) // 2]
        check = sorted(r["check_s"] for r in mine)[len(mine) // 2]
        summary[name] = dict(push_s_median=med, push_share=med / args.step_s, check_s_median=check, sync_mb=mine[0]["sync_mb"])
        print(f"{name:<13} {med:>16.2f} {100 * med / args.step_s:>17.2f}% {check:>8.2f} {mine[0]['sync_mb']:>6.0f}")
    out = ROOT / "bench_results"
    out.mkdir(exist_ok=True)
    meta = dict(mode="push", recipe=args.recipe, repeats=args.repeats, step_s=args.step_s, overrides=args.overrides,
                cpus=os.cpu_count(), load_average=os.getloadavg(), machine=machine_info())
    (out / "sync_push.json").write_text(json.dumps(dict(meta=meta, summary=summary, rows=rows), indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(list(summary), [100 * v["push_share"] for v in summary.values()])
    ax.axhline(2, color="k", ls="--", lw=1, label="target 2%")
    ax.set_ylabel(f"push, % of a {args.step_s:g} s step")
    ax.set_title(f"weight push, {args.recipe} (median of {args.repeats})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sync_push.png", dpi=120)
    print(f"wrote {out / 'sync_push.json'} and {out / 'sync_push.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["run", "push"], default="run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-s", type=float, default=32.0)
    parser.add_argument("--recipe", default="grpo_smollm2")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    if args.mode == "push":
        sys.path.insert(0, str(ROOT))
        push_only(args)
        return
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in RUNS:
            rows += summarize(name, run(name, settings, args, Path(tmp)), args.steps)
    print(f"{'run':<20} {'step':>4} {'age':>3} {'step s':>7} {'push s':>7} {'push %':>7} {'sync s':>7} {'sync %':>7} "
          f"{'MB':>5} {'gap':>8}")
    for r in rows:
        note = "  (last step: push re-scored)" if r["rescored"] else ("  (warm-up)" if r["step"] == 1 else "")
        print(f"{r['run']:<20} {r['step']:>4} {r['batch_age']:>3} {r['step_s']:>7.1f} {r['push_s']:>7.2f} "
              f"{100 * r['push_share']:>6.2f}% {r['sync_s']:>7.2f} {100 * r['sync_share']:>6.2f}% {r['sync_mb']:>5.0f} "
              f"{r['logprob_gap'] or 0:>8.1e}{note}")
    summary = medians(rows)
    print("\nmedians over steps >= 2:")
    for name, m in summary.items():
        print(f"  {name:<20} step {m['step_s']:6.1f} s   sync mid-run {m['sync_s_mid_run']:5.2f} s "
              f"({100 * m['sync_share_mid_run']:.2f}% of the step)   sync, all steps {100 * m['sync_share_all']:.2f}%")
    ratios = dict(
        collective_over_object_store_sync=summary["collective"]["sync_s_mid_run"] / summary["object_store"]["sync_s_mid_run"],
        shared_memory_over_broadcast_sync=summary["collective"]["sync_s_mid_run"] / summary["collective_broadcast"]["sync_s_mid_run"],
        overlap_speedup=summary["collective"]["step_s"] / summary["collective_overlap"]["step_s"],
    )
    print(f"  collective / object_store sync seconds: {ratios['collective_over_object_store_sync']:.2f}; "
          f"shared memory / broadcast: {ratios['shared_memory_over_broadcast_sync']:.2f}; "
          f"step time max_staleness 0 / 1: {ratios['overlap_speedup']:.2f}x")
    out = ROOT / "bench_results"
    out.mkdir(exist_ok=True)
    meta = dict(recipe=args.recipe, steps=args.steps, overrides=args.overrides, cpus=os.cpu_count(),
                load_average=os.getloadavg(), wall_s=time.time() - started,
                note="a shared machine: timings are noisy, compare within this run", machine=machine_info())
    (out / "sync.json").write_text(json.dumps(dict(meta=meta, summary=summary, ratios=ratios, rows=rows), indent=1))
    plot(rows, summary, out / "sync.png")
    print(f"wrote {out / 'sync.json'} and {out / 'sync.png'}")


if __name__ == "__main__":
    main()
