"""Generation through the Ray pool versus the same vLLM engine in this process.

    PYTHONPATH=. python scripts/bench_pool_threads.py [--model smollm2-135m-instruct] [--prompts 4] [--n 4] [--max-tokens 160]

Three ways to run one engine with the same weights, prompts and seeds, one after the other:
in-process; in the pool placed by the resource plan (threads follow the node's cores); in the
pool's old way, an actor reserving 1 CPU, where Ray sets OMP_NUM_THREADS=1. Prints tokens/s of
each (best of --repeats) and writes bench_results/pool_threads.json and .png. The goal: the
placed pool within 10% of in-process.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine_info import machine_info  # scripts/machine_info.py: CPU model, vector extensions, cores

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did she sell altogether?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. She has only half of the money she needs. How much more does she need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he write a year?",
]


def tokens_per_s(generate, prompts, spec, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        groups = generate(prompts, spec)
        seconds = time.perf_counter() - t0
        best = max(best, sum(len(c.token_ids) for g in groups for c in g) / seconds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray
    from transformers import AutoTokenizer

    from rl.config import RunConfig
    from rl.models import resolve_model_path
    from rl.loop.placement import ResourcePlan
    from rollouts.registry import make_engine
    from rollouts.pool import RolloutPool
    from rl.core.types import SamplingSpec

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True)
        for i in range(args.prompts)
    ]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    spec = SamplingSpec(n=args.n, temperature=1.0, max_tokens=args.max_tokens)
    kw = dict(max_model_len=1024, kv_cache_gb=1.0)
    results = {}

    engine = make_engine("vllm", path, seed=0, **kw)
    engine.set_step_seed(1)
    results["in_process"] = tokens_per_s(engine.generate, prompts, spec, args.repeats)
    print(f"in_process {results['in_process']:.1f} tokens/s", flush=True)
    engine.close()
    del engine

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = RunConfig()
    plan = ResourcePlan.from_config(cfg, on_gpu=False).apply()
    for name, extra in [("pool_placed", dict(placement=plan)), ("pool_1cpu_actor", dict(engine_cpus=1))]:
        pool = RolloutPool("vllm", path, seed=0, timeout_s=900, **extra, **kw)
        pool.set_step_seed(1)
        results[name] = tokens_per_s(pool.generate, prompts, spec, args.repeats)
        results[name + "_threads"] = pool.apply(lambda e: __import__("torch").get_num_threads())[0]
        print(f"{name} {results[name]:.1f} tokens/s ({results[name + '_threads']} threads)", flush=True)
        pool.close()
    plan.release()
    ray.shutdown()

    base = results["in_process"]
    for name in ("in_process", "pool_placed", "pool_1cpu_actor"):
        print(f"{name:<16} {results[name]:8.1f} tokens/s  {results[name] / base:5.2f}x in-process")
    out = ROOT / "bench_results"
    out.mkdir(exist_ok=True)
    meta = dict(vars(args), machine=machine_info(), note="a machine shared with other jobs; runs one after the other")
    (out / "pool_threads.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    names = ["in_process", "pool_placed", "pool_1cpu_actor"]
    ax.bar(names, [results[n] for n in names])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"vLLM generation, {args.prompts}x{args.n} x {args.max_tokens} tokens")
    fig.tight_layout()
    fig.savefig(out / "pool_threads.png", dpi=120)
    print(f"wrote {out / 'pool_threads.json'} and {out / 'pool_threads.png'}")


if __name__ == "__main__":
    main()
