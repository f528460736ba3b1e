"""Peak memory and time of the OPSD divergence, forward + backward: chunked versus naive full logits.

    PYTHONPATH=. python scripts/bench_divergence.py [--tokens 1024 4096 16384] [--vocab 150000] [--hidden 256]

Writes bench_results/divergence.json and bench_results/divergence.png and prints a table.

Each configuration runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its
own. `over_base` is that peak minus the RSS just before the measured call (inputs built, threads
warmed up): what the divergence itself needed. Large CPU tensors come straight from mmap and go
back on free, so RSS follows tensor allocations.

A naive configuration whose projected peak (linear in tokens, from the largest naive run that
fitted) exceeds the memory budget is not started; it is reported with that projection. Each child
also runs under RLIMIT_DATA = budget, so a wrong projection ends in a failed allocation (reported
as oom), not in the kernel's OOM killer taking down a neighbour.

The helpers here also drive scripts/bench_entropy.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from machine_info import machine_info  # scripts/machine_info.py: CPU model, vector extensions, cores

GB = 1e9
RESULTS = Path("bench_results")
WARMUP_TOKENS = 64

Phases = list[tuple[str, Callable[[], object]]]


def divergence_phases(impl: str, tokens: int, args: argparse.Namespace) -> Phases:
    """Student hidden states with grad, teacher hidden states without, one shared lm_head with grad."""
    import torch

    from rl.algorithms import losses
    from rl.algorithms.divergences import chunked_divergence, divergence

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden**-0.5).requires_grad_()
    student = torch.randn(1, tokens, args.hidden, generator=g).requires_grad_()
    teacher = student.detach() + 0.5 * torch.randn(1, tokens, args.hidden, generator=g)
    mask = torch.ones(1, tokens)
    opts = dict(kind="forward_kl", temperature=1.1, clip=0.05)  # the paper's final setting
    state = {}

    def forward():
        if impl == "chunked":
            per_token = chunked_divergence(student, teacher, weight, mask, chunk_size=args.chunk_size, **opts)
        else:
            with torch.no_grad():
                teacher_logits = teacher @ weight.T
            per_token = divergence(student @ weight.T, teacher_logits, **opts)
        state["loss"] = losses.aggregate(per_token, mask, "token_mean", float(tokens))
        return state["loss"].item()

    def backward():
        state.pop("loss").backward()

    return [("forward", forward), ("backward", backward)]


def child(phases_for: Callable[[str, int, argparse.Namespace], Phases], args: argparse.Namespace) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch

    torch.set_num_threads(args.threads)
    for _, run in phases_for(args.child_impl, WARMUP_TOKENS, args):
        run()
    phases = phases_for(args.child_impl, args.child_tokens, args)
    base = psutil.Process().memory_info().rss
    result = {"impl": args.child_impl, "tokens": args.child_tokens, "status": "ok", "seconds": {}}
    try:
        for name, run in phases:
            start = time.perf_counter()
            value = run()
            result["seconds"][name] = round(time.perf_counter() - start, 2)
            if value is not None:
                result["value"] = value
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        result.update(status="oom", error=str(err).splitlines()[0][:200])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result.update(peak_gb=round(peak / GB, 3), base_gb=round(base / GB, 3), over_base_gb=round((peak - base) / GB, 3))
    return result


def run_child(script: Path, impl: str, tokens: int, args: argparse.Namespace, budget: float) -> dict:
    cmd = [sys.executable, str(script), "--child-impl", impl, "--child-tokens", str(tokens),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
           "--threads", str(args.threads)]

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_DATA, (int(budget), int(budget)))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_memory)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return {"impl": impl, "tokens": tokens, "status": f"failed (exit {proc.returncode})", "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_grid(script: Path, impls: list[str], args: argparse.Namespace, budget: float) -> list[dict]:
    """Every impl at every token count, smallest first; naive runs that cannot fit are projected, not run.

    Only the naive impl is projected: its peak grows linearly with tokens, the chunked one's does not.
    """
    rows = []
    for impl in impls:
        fitted = None  # (tokens, base, peak) of the largest run of this impl that fitted
        for tokens in sorted(args.tokens):
            projected = None
            if fitted is not None and impl != "chunked":
                t0, base, peak = fitted
                projected = base + (peak - base) * tokens / t0
            if projected is not None and projected > budget:
                row = {"impl": impl, "tokens": tokens, "status": "skipped: projected peak over budget"}
            else:
                print(f"running {impl} at {tokens} tokens ...", flush=True)
                row = run_child(script, impl, tokens, args, budget)
            if projected is not None:
                row["projected_peak_gb"] = round(projected / GB, 2)
            if row["status"] == "ok":
                fitted = (tokens, row["base_gb"] * GB, row["peak_gb"] * GB)
            rows.append(row)
    return rows


def _cell(value, width: int, fmt: str = ".2f") -> str:
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def print_table(title: str, rows: list[dict], vocab: int) -> None:
    phases = list(dict.fromkeys(name for r in rows for name in r.get("seconds", {})))
    header = (f"{'impl':8} {'tokens':>6} {'[N,V] GB':>8} " + " ".join(f"{p + ' s':>10}" for p in phases)
              + f" {'peak GB':>8} {'over base':>9} {'proj. GB':>8} {'value':>9}  status")
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for r in rows:
        secs = r.get("seconds", {})
        print(" ".join([f"{r['impl']:8}", f"{r['tokens']:>6}", _cell(r["tokens"] * vocab * 4 / GB, 8)]
                       + [_cell(secs.get(p), 10, ".1f") for p in phases]
                       + [_cell(r.get("peak_gb"), 8), _cell(r.get("over_base_gb"), 9),
                          _cell(r.get("projected_peak_gb"), 8), _cell(r.get("value"), 9, ".5f"), f" {r['status']}"]))


def plot(name: str, rows: list[dict], budget: float, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, color in (("chunked", "tab:blue"), ("naive", "tab:red")):
        done = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
        ax.plot([r["tokens"] for r in done], [r["peak_gb"] for r in done], "o-", color=color, label=f"{impl} (measured)")
        guessed = [r for r in rows if r["impl"] == impl and r["status"] != "ok" and "projected_peak_gb" in r]
        if guessed and done:
            ax.plot([done[-1]["tokens"]] + [r["tokens"] for r in guessed],
                    [done[-1]["peak_gb"]] + [r["projected_peak_gb"] for r in guessed],
                    "o--", mfc="none", color=color, label=f"{impl} (projected, not run)")
    ax.axhline(budget / GB, color="gray", ls=":", label="memory budget")
    ax.set(xscale="log", xlabel="completion tokens", ylabel="peak RSS (GB)", title=title)
    ax.set_xticks(sorted({r["tokens"] for r in rows}), [str(t) for t in sorted({r["tokens"] for r in rows})])
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    fig.savefig(path, dpi=120)
    return path


def parse_args(default_tokens: list[int]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=default_tokens)
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--hidden", type=int, default=256, help="small, so that time goes to the vocabulary")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--mem-budget-gb", type=float, default=None,
                        help="per configuration; default: 14 GB or 75%% of the memory available now, if less")
    parser.add_argument("--child-impl", help=argparse.SUPPRESS)
    parser.add_argument("--child-tokens", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def benchmark(name: str, script: Path, phases_for, default_tokens: list[int], title: str) -> None:
    """Parent: run the grid, print, write bench_results/<name>.json and .png. Child: measure one config."""
    args = parse_args(default_tokens)
    if args.child_impl:
        print(json.dumps(child(phases_for, args)))
        return
    budget = (args.mem_budget_gb * GB if args.mem_budget_gb
              else min(14 * GB, 0.75 * psutil.virtual_memory().available))
    rows = run_grid(script, ["chunked", "naive"], args, budget)
    print_table(f"{title} (vocab {args.vocab}, hidden {args.hidden}, chunk {args.chunk_size}, "
                f"{args.threads} threads, budget {budget / GB:.1f} GB)", rows, args.vocab)
    RESULTS.mkdir(exist_ok=True)
    meta = {"vocab": args.vocab, "hidden": args.hidden, "chunk_size": args.chunk_size, "threads": args.threads,
            "budget_gb": round(budget / GB, 2), "cpu": _cpu_name(), "machine": machine_info()}
    (RESULTS / f"{name}.json").write_text(json.dumps({"config": meta, "results": rows}, indent=1) + "\n")
    print(f"\nwrote {RESULTS / f'{name}.json'} and {plot(name, rows, budget, title)}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    benchmark("divergence", Path(__file__).resolve(), divergence_phases, [1024, 4096, 16384],
              "OPSD forward KL, forward + backward")
