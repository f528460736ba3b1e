"""The diffusion engine's reported log-probs under each likelihood estimator: rows one per forward
against rows stacked into forwards (rollouts.estimators.rows.estimate_rows, `rows_per_forward`),
side by side in one process, on the tiny masked-diffusion model of igpo_tiny.

    PYTHONPATH=. python scripts/bench_estimators.py [--rows 512] [--repeats 3]

Prints seconds per call (median of the repeats) and the speed-up, checks that both give the same
terms, and writes bench_results/estimators.json with the machine.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from machine_info import machine_info  # scripts/machine_info.py: CPU model, vector extensions, cores

ESTIMATORS = [("one_step", 1), ("mc_elbo", 3), ("coupled", 1)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/estimators.json")
    args = parser.parse_args()

    import torch

    import rl.demo.tiny  # noqa: F401  (registers the built model)
    from rl.models import resolve_model_path
    from rollouts.diffusion_engine import MaskedDiffusionEngine
    from rollouts.estimators.rows import estimate_rows

    engine = MaskedDiffusionEngine(resolve_model_path("tiny-dllm-chain-addition"), seed=0, answer_length=24,
                                   block_length=8, steps=12)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 300) for _ in range(10)] for _ in range(args.rows)]
    completions = [[rng.randrange(5, 300) for _ in range(rng.randint(10, 24))] for _ in range(args.rows)]

    def run(name, n, rows_per_forward):
        return estimate_rows(lambda i, a: engine._logits(i, a).cpu(), name, prompts, completions, answer_length=24,
                             pad_id=engine.pad_id, mask_id=engine.mask_id, n=n, rows_per_forward=rows_per_forward)

    results = []
    for name, n in ESTIMATORS:
        row = {"estimator": name, "n": n}
        outputs = {}
        for label, per_forward in (("one_row", 1), ("stacked_16", 16)):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                outputs[label] = run(name, n, per_forward)
                times.append(time.perf_counter() - start)
            row[f"{label}_s"] = statistics.median(times)
        worst = max(abs(a - b) for x, y in zip(outputs["one_row"], outputs["stacked_16"]) for a, b in zip(x, y))
        row["max_abs_difference"] = worst
        row["speedup"] = row["one_row_s"] / row["stacked_16_s"]
        results.append(row)
        print(f"{name:<9} n={n}: one row a forward {row['one_row_s']:.2f} s, 16 rows {row['stacked_16_s']:.2f} s, "
              f"{row['speedup']:.1f}x; max |difference| {worst:.1e}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
                               "machine": machine_info(), "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
