"""Every benchmark JSON records the machine it came from (scripts/machine_info.py): the CPU model,
its vector extensions and the core count, since machines of one kind differ (AVX-512 or AVX2 only)."""
import ast
import os
import sys
from pathlib import Path

from rl.core.paths import PROJECT_ROOT

SCRIPTS = PROJECT_ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
from machine_info import _cpuinfo, machine_info  # noqa: E402

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse4_2 avx f16c avx2 fma avx512f avx512dq avx512bw avx512_vnni avx512_bf16 amx_tile amx_bf16 sha_ni
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_2 avx f16c avx2 fma sha_ni
processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_2 avx f16c avx2 fma sha_ni
"""


def test_cpuinfo_names_the_model_and_its_vector_extensions():
    assert _cpuinfo(XEON) == ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
                              ["amx_bf16", "amx_tile", "avx", "avx2", "avx512_bf16", "avx512_vnni", "avx512bw",
                               "avx512dq", "avx512f", "f16c", "fma", "sse4_2"])
    assert _cpuinfo(EPYC) == ("AMD EPYC 7B12", ["avx", "avx2", "f16c", "fma", "sse4_2"])


def test_machine_info_describes_this_machine(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    info = machine_info()
    text = Path("/proc/cpuinfo").read_text()
    model, vector = _cpuinfo(text)
    assert info["cpu_model"] == model and model in text
    assert info["vector_extensions"] == vector and info["avx512"] == any(f.startswith("avx512") for f in vector)
    assert info["cores"] == os.cpu_count() and 1 <= info["usable_cores"] <= info["cores"]
    assert info["ATEN_CPU_CAPABILITY"] == "avx2"  # an emulated profile is recorded with the figures
    assert info["torch_cpu_capability"]


def _calls(tree: ast.AST) -> set[str]:
    return {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


def test_every_benchmark_script_records_the_machine_in_its_json():
    scripts = sorted(SCRIPTS.glob("bench_*.py"))
    assert len(scripts) >= 6
    for script in scripts:
        tree = ast.parse(script.read_text())
        calls = _calls(tree)
        # bench_entropy writes its JSON through bench_divergence.benchmark, which records it.
        assert "machine_info" in calls or ("benchmark" in calls and "bench_divergence" in script.read_text()), script.name
