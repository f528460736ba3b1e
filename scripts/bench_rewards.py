"""Reward throughput: math_verify on 1,000 MATH500-style completions, inline versus the worker pool.

    python scripts/bench_rewards.py [--local-dir ../shared/data] [--out bench_results/rewards.json]

Completions are MATH500 reference solutions, half scored against their own gold answer (right)
and half against another row's (wrong). Each mode starts with empty answer and sympy caches,
after a short warm-up on unrelated answers (worker start and math-verify's lazy loading). The pool's
overhead is measured with a reward that does almost nothing (boxed_format): per completion in a
large batch on one worker, and per score() call for a one-completion batch. Each figure is the
best of --repeats runs, and the load average is recorded: the machine may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rewards.math import _parse_answer  # noqa: E402  (cleared so every mode starts cold)
from rewards.scoring import RewardScorer  # noqa: E402
from machine_info import machine_info  # noqa: E402  (scripts/machine_info.py: CPU model, vector extensions, cores)


def math500_batch(local_dir: str, n: int) -> tuple[list[str], list[dict]]:
    path = (ROOT / local_dir / "math500" / "test.jsonl").resolve()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts, golds = [], []
    for i in range(n):
        row = rows[i % len(rows)]
        source = row if i < n // 2 else rows[(i + 1) % len(rows)]
        texts.append(source["solution"])
        golds.append({"answer": row["answer"]})
    return texts, golds


def timed_score(scorer: RewardScorer, texts: list[str], rows: list[dict]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    result = scorer.score(texts, rows)
    return time.perf_counter() - start, result.totals


# Unrelated answers that exercise math-verify's lazily loaded parsers in every worker before the
# clock starts; the figure is then the steady state a training run sees after its first step.
WARM_UP = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{\\sqrt{2}}", "2"), ("\\boxed{(1,2]}", "(1,2]"),
           ("\\boxed{x^2+1}", "x^2+1"), ("\\boxed{\\text{yes}}", "no"), ("\\boxed{50\\%}", "0.5")] * 2


def bench_math_verify(texts, rows, workers: int, repeats: int) -> dict:
    """Best of `repeats` runs, each with fresh workers and empty answer and sympy caches."""
    from sympy.core.cache import clear_cache

    runs = []
    for _ in range(repeats):
        with RewardScorer([("math_verify", 1.0)], workers=workers, timeout_s=30.0) as scorer:
            start_s, _ = timed_score(scorer, [t for t, _ in WARM_UP], [{"answer": a} for _, a in WARM_UP])
            _parse_answer.cache_clear()
            clear_cache()
            seconds, totals = timed_score(scorer, texts, rows)
        runs.append((seconds, start_s, totals))
    seconds, start_s, totals = min(runs, key=lambda r: r[0])
    return {
        "workers": workers,
        "seconds": round(seconds, 3),
        "completions_per_s": round(len(texts) / seconds, 1),
        "all_runs_s": [round(r[0], 3) for r in runs],
        "start_and_warm_up_s": round(start_s, 3),
        "mean_reward": sum(totals) / len(totals),
    }


def bench_overhead(n: int, repeats: int) -> dict:
    texts, rows = ["so \\boxed{7}"] * n, [{"answer": "7"}] * n
    inline = RewardScorer([("boxed_format", 1.0)])
    inline_s = min(timed_score(inline, texts, rows)[0] for _ in range(repeats))
    with RewardScorer([("boxed_format", 1.0)], workers=1) as scorer:
        timed_score(scorer, texts[:1], rows[:1])
        pool_s = min(timed_score(scorer, texts, rows)[0] for _ in range(repeats))
        single = [timed_score(scorer, texts[:1], rows[:1])[0] for _ in range(50)]
    return {
        "tasks": n,
        "inline_us_per_completion": round(1e6 * inline_s / n, 2),
        "pool_us_per_completion": round(1e6 * pool_s / n, 2),
        "pool_overhead_us_per_completion": round(1e6 * (pool_s - inline_s) / n, 2),
        "pool_ms_per_one_completion_call": round(1e3 * statistics.median(single), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local-dir", default="../shared/data")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per mode")
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "rewards.json"))
    args = parser.parse_args()

    texts, rows = math500_batch(args.local_dir, args.n)
    modes = [bench_math_verify(texts, rows, workers, args.repeats) for workers in (0, 1, 2)]
    for m in modes:
        label = "inline" if m["workers"] == 0 else f"pool, {m['workers']} worker(s)"
        print(f"math_verify, {args.n} MATH500 completions, {label}: {m['completions_per_s']}/s "
              f"({m['seconds']} s; start + warm-up {m['start_and_warm_up_s']} s; mean reward {m['mean_reward']:.3f})")
    overhead = bench_overhead(10 * args.n, args.repeats)
    print(f"pool overhead: {overhead['pool_overhead_us_per_completion']} us per completion "
          f"(inline {overhead['inline_us_per_completion']} us, pool {overhead['pool_us_per_completion']} us, "
          f"1 worker); {overhead['pool_ms_per_one_completion_call']} ms per score() call of one completion")
    result = {
        "machine": {**machine_info(), "platform": platform.platform()},
        "math_verify": modes,
        "overhead": overhead,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
