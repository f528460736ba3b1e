"""Masked-diffusion sampling speed on CPU: the plain sampler against the block KV cache (prefix,
dual) and dual cache + confidence-threshold parallel decoding (issue 26's targets).

    PYTHONPATH=. python scripts/bench_diffusion.py            # the issue's setting (long: run on an idle machine)
    PYTHONPATH=. python scripts/bench_diffusion.py --smoke    # a seconds-long check that it all runs

Model: rollouts.llada_model.LLaDAForDiffusion with random weights, LLaDA-shaped (RMSNorm, RoPE,
SwiGLU, bidirectional, LLaDA's vocabulary of 126464 and its 3x MLP ratio) at d_model 768, 12
layers, 12 heads: about 280M parameters, float32. Batch 8, random 64-token prompts, 256 answer
tokens in blocks of 32, 128 steps (the release's igpo_llada setting), greedy (temperature 0).

Each mode runs in its own subprocess so that its peak resident memory (ru_maxrss) is its own; the
model is rebuilt from the same seed there. Reported per mode: wall time, answer tokens/s, model
calls per block (and how many were full-width refreshes), peak RSS and RSS after building the
model, and the fraction of answer tokens equal to the plain sampler's (the cache is approximate,
and parallel decoding commits differently). A random model is not confident, so the 0.9 threshold
rarely fires and the parallel mode may take more calls than the schedule; --head-scale multiplies
the output projection to make the model more confident (recorded in the JSON).

Writes bench_results/diffusion.json and bench_results/diffusion.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from machine_info import machine_info  # scripts/machine_info.py: CPU model, vector extensions, cores

MODES = {
    "plain": dict(cache=None, threshold=None),  # rollouts.diffusion.diffusion_sample, today's sampler
    "prefix": dict(cache="prefix", threshold=None),
    "dual": dict(cache="dual", threshold=None),
    "dual+parallel": dict(cache="dual", threshold="arg"),
}


def cpu_info() -> dict:
    """CPU model, the vector extensions torch can use, core counts and torch's threads."""
    import torch

    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    return dict(model=model, vector_flags=[f for f in wanted if f in flags], torch_cpu_capability=capability,
                cpu_count=os.cpu_count(), affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                torch_threads=torch.get_num_threads(), load_average=os.getloadavg(), torch=torch.__version__)


def settings(args) -> dict:
    if args.smoke:
        return dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=192, vocab=1000, batch=2, prompt_length=8,
                    gen_length=32, block_length=8, steps=16)
    return dict(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, mlp_hidden_size=3 * args.d_model,
                vocab=args.vocab, batch=args.batch, prompt_length=args.prompt_length, gen_length=args.gen_length,
                block_length=args.block_length, steps=args.steps)


class Progress:
    """Counts model calls; prints calls done, rate and ETA every `every` seconds."""

    def __init__(self, label: str, expected_calls: int, every: float, bound: bool = False):
        self.label, self.expected, self.every, self.bound = label, expected_calls, every, bound
        self.calls, self.start, self.last = 0, time.perf_counter(), 0.0

    def tick(self):
        self.calls += 1
        now = time.perf_counter() - self.start
        if now - self.last >= self.every or self.calls == self.expected:
            self.last = now
            rate = self.calls / now if now else 0.0
            eta = (self.expected - self.calls) / rate if rate and self.calls < self.expected else 0.0
            print(f"  [{self.label}] {self.calls}/{'<=' if self.bound else ''}{self.expected} calls, "
                  f"{rate:.2f} calls/s, {now:.0f}s elapsed, ETA {'<=' if self.bound else ''}{eta:.0f}s", flush=True)


class CountingModel:
    """The cache-capable model, with every forward_cached call counted for the progress lines."""

    def __init__(self, model, progress: Progress):
        self.model, self.progress = model, progress

    def parameters(self):
        return self.model.parameters()

    def forward_cached(self, *a, **kw):
        self.progress.tick()
        return self.model.forward_cached(*a, **kw)


def run_child(mode: str, args) -> dict:
    import torch

    from rollouts.diffusion import diffusion_sample
    from rollouts.diffusion_cached import cached_diffusion_sample
    from rollouts.llada_model import LLaDAConfig, LLaDAForDiffusion

    s = settings(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mask_id = s["vocab"] - 1
    config = LLaDAConfig(d_model=s["d_model"], n_heads=s["n_heads"], n_layers=s["n_layers"], mlp_hidden_size=s["mlp_hidden_size"],
                         vocab_size=s["vocab"], mask_token_id=mask_id, rope_theta=500000.0)
    model = LLaDAForDiffusion(config).eval()
    with torch.no_grad():
        model.model.transformer.ff_out.weight.mul_(args.head_scale)
    params = sum(p.numel() for p in model.parameters())
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, mask_id - 1, (s["batch"], s["prompt_length"]), generator=g).tolist()
    kw = dict(mask_id=mask_id, pad_id=0, gen_length=s["gen_length"], block_length=s["block_length"], steps=s["steps"],
              temperature=0.0)
    spec = MODES[mode]
    blocks = s["gen_length"] // s["block_length"]
    expected = s["steps"] if spec["threshold"] is None else s["gen_length"]
    progress = Progress(mode, expected, args.progress_every, bound=spec["threshold"] is not None)
    start = time.perf_counter()
    if spec["cache"] is None:
        def logits_fn(ids, attention):
            progress.tick()
            return model(ids, attention).logits
        out = diffusion_sample(logits_fn, prompts, **kw)
        calls_per_block, full_calls = [s["steps"] // blocks] * blocks, s["steps"]
    else:
        out = cached_diffusion_sample(CountingModel(model, progress), prompts, cache=spec["cache"],
                                      threshold=args.threshold if spec["threshold"] else None, **kw)
        calls_per_block, full_calls = out.calls_per_block, out.full_calls
    seconds = time.perf_counter() - start
    tokens = s["batch"] * s["gen_length"]
    return dict(mode=mode, seconds=seconds, tokens_per_s=tokens / seconds, model_calls=sum(calls_per_block),
                calls_per_block=calls_per_block, full_calls=full_calls, params=params,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rss_after_model_mib=rss_model / 1024,
                tokens=out.tokens.tolist())


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["mode"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [r["tokens_per_s"] for r in results], color="tab:blue")
    axes[0].set_ylabel("answer tokens / s")
    for i, r in enumerate(results):
        axes[0].annotate(f"{r['speedup']:.2f}x", (i, r["tokens_per_s"]), ha="center", va="bottom")
    axes[1].bar(names, [r["model_calls"] / len(r["calls_per_block"]) for r in results], color="tab:orange")
    axes[1].set_ylabel("model calls per block (mean)")
    axes[2].bar(names, [r["peak_rss_mib"] for r in results], color="tab:green", label="peak RSS")
    axes[2].bar(names, [r["rss_after_model_mib"] for r in results], color="tab:gray", label="after building the model")
    axes[2].set_ylabel("MiB")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model and schedule: checks that everything runs")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=126464)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-length", type=int, default=64)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--head-scale", type=float, default=1.0, help="multiply the output projection (a more confident random model)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--out", default="bench_results")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args)), flush=True)
        return

    results = []
    passthrough = [a for a in sys.argv[1:] if a not in ("--modes",) and a not in args.modes]
    for mode in args.modes:
        print(f"{mode}: running in a subprocess", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
        # The child's progress lines are passed on as they come; its RESULT line is kept.
        proc = subprocess.Popen([sys.executable, __file__, *passthrough, "--child", mode], stdout=subprocess.PIPE, text=True,
                                env=env, bufsize=1)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not line.startswith("RESULT "):
                print(line, end="", flush=True)
        if proc.wait():
            raise SystemExit(f"{mode} failed (exit {proc.returncode})")
        results.append(json.loads(next(line for line in lines if line.startswith("RESULT "))[len("RESULT "):]))
        r = results[-1]
        print(f"{mode}: {r['seconds']:.1f}s, {r['tokens_per_s']:.1f} tokens/s, {r['model_calls']} calls "
              f"({r['full_calls']} full), peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)

    base = next((r for r in results if r["mode"] == "plain"), None)
    for r in results:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        if base:
            same = sum(a == b for ra, rb in zip(r["tokens"], base["tokens"]) for a, b in zip(ra, rb))
            r["token_agreement_with_plain"] = same / sum(len(x) for x in base["tokens"])
    for r in results:
        del r["tokens"]
    s = settings(args)
    meta = dict(settings=s, params=results[0]["params"] if results else None, threshold=args.threshold, head_scale=args.head_scale,
                smoke=args.smoke, temperature=0.0, cpu=cpu_info(), machine=machine_info(), targets=dict(prefix_speedup=2.5, dual_parallel_speedup=5.0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "diffusion_smoke" if args.smoke else "diffusion"
    (out / f"{name}.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    title = (f"LLaDA-shaped random model, {meta['params'] / 1e6:.0f}M params, batch {s['batch']}, {s['gen_length']} tokens "
             f"in blocks of {s['block_length']}, {s['steps']} steps; {meta['cpu']['model']}, {meta['cpu']['torch_threads']} threads")
    plot(results, out / f"{name}.png", title)
    print(f"\n{'mode':<15}{'tokens/s':>10}{'speedup':>9}{'calls':>7}{'full':>6}{'peak MiB':>10}{'agree':>7}")
    for r in results:
        print(f"{r['mode']:<15}{r['tokens_per_s']:>10.1f}{r['speedup']:>9.2f}{r['model_calls']:>7}{r['full_calls']:>6}"
              f"{r['peak_rss_mib']:>10.0f}{r.get('token_agreement_with_plain', float('nan')):>7.2f}")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')}")


if __name__ == "__main__":
    main()
