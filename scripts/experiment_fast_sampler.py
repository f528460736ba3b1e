"""Do the block cache and parallel decoding cost accuracy? The masked-diffusion sampler with a KV
cache (rollout.diffusion.cache, prefix or dual) and/or a confidence threshold (rollout.diffusion.threshold,
Fast-dLLM's rules) against the plain sampler, on the igpo_tiny task.

    PYTHONPATH=. python scripts/experiment_fast_sampler.py [limit=256] [seeds=0,1,2] [out=bench_results]
        [model=tiny-dllm-chain-addition | tiny-llada-chain-addition]

For each sampler: greedy accuracy on the first `limit` held-out problems, and accuracy when sampling
at the training temperature (1.0) with each seed; with the model calls per answer block each took.
The default model is BERT-shaped and gets no KV cache, so only thresholds are measured; the LLaDA-
architecture one (rollouts.llada_model) gets the cached samplers too. Writes <out>/fast_sampler.json
(fast_sampler_<model>.json for another model) and prints a table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

THRESHOLDS = (None, 0.9, 0.7, 0.5)
# (cache, threshold): the samplers a LLaDA-architecture model is measured with
CACHED = (("none", None), ("prefix", None), ("dual", None), ("dual", 0.9), ("none", 0.9))


class CountingEngine:
    """An engine whose generate calls record the sampler's model calls per block."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompts, spec, hints=None):
        groups = self.engine.generate(prompts, spec, hints)
        self.calls += [c.sampler_calls for group in groups for c in group]
        return groups


def measure(cache: str, threshold, limit: int, seeds: list[int], out: Path, model: str) -> dict:
    from transformers import AutoTokenizer

    from rl.config import load_config
    from rl.evaluate import Evaluator
    from rl.models import resolve_model_path
    from rollouts.registry import make_engine

    overrides = [f"model.path={model}", f"rollout.diffusion.cache={cache}"]
    overrides += [] if threshold is None else [f"rollout.diffusion.threshold={threshold}"]
    cfg = load_config("igpo_tiny", overrides + ["eval.benchmarks=[synthetic:chain_addition]", f"eval.limit={limit}"])
    path = resolve_model_path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    result = {"cache": cache, "threshold": threshold}
    for name, temperature, run_seeds in (("greedy", 0.0, [0]), ("sampled_T1", 1.0, seeds)):
        evaluator = Evaluator(tokenizer, cfg.eval.model_copy(update={"temperature": temperature, "top_p": 1.0, "top_k": -1}))
        settings = cfg.rollout.engine_settings(cfg.model, max_model_len=evaluator.context_tokens())
        accuracies, calls = [], []
        for seed in run_seeds:
            engine = CountingEngine(make_engine("diffusion", path, seed=seed, settings=settings))
            metrics = evaluator.run(engine, out / f"fast_sampler_{model}_{cache}_{threshold}_{name}_{seed}")
            accuracies.append(metrics["eval/synthetic:chain_addition/pass@1"])
            calls += engine.calls
        result[name] = {"accuracy": accuracies, "calls_per_block": sum(calls) / len(calls)}
        print(f"cache {cache}, threshold {threshold}: {name} accuracy {accuracies}, "
              f"{result[name]['calls_per_block']:.2f} calls per block",
              file=sys.stderr, flush=True)
    return result


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    limit, out = int(args.get("limit", 256)), Path(args.get("out", "bench_results"))
    seeds = [int(s) for s in args.get("seeds", "0,1,2").split(",")]
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from machine_info import machine_info  # scripts/machine_info.py

    model = args.get("model", "tiny-dllm-chain-addition")
    import rl.demo.tiny  # noqa: F401  (registers the built models)
    from rl.models import resolve_model_path
    from rollouts.llada_model import is_llada_checkpoint

    samplers = CACHED if is_llada_checkpoint(str(resolve_model_path(model))) else [("none", t) for t in THRESHOLDS]
    results = [measure(c, t, limit, seeds, Path("/tmp/fast_sampler_records"), model) for c, t in samplers]
    name = "fast_sampler.json" if model == "tiny-dllm-chain-addition" else f"fast_sampler_{model}.json"
    (out / name).write_text(json.dumps({"machine": machine_info(), "model": model, "limit": limit, "seeds": seeds,
                                        "results": results}, indent=1) + "\n")
    print("| sampler | greedy accuracy | calls/block | sampled T=1 accuracy (seeds) | calls/block |")
    print("|---|---|---|---|---|")
    for r in results:
        parts = ([] if r["cache"] == "none" else [f"{r['cache']} cache"]) + (
            [] if r["threshold"] is None else [f"threshold {r['threshold']}"])
        name = " + ".join(parts) or "plain"
        g, s = r["greedy"], r["sampled_T1"]
        print(f"| {name} | {g['accuracy'][0]:.3f} | {g['calls_per_block']:.2f} | "
              f"{', '.join(f'{a:.3f}' for a in s['accuracy'])} | {s['calls_per_block']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
