#!/usr/bin/env bash
# Installs what is needed (once), then launches training: bash scripts/run.sh recipe=NAME key=value ...
# With no arguments it runs the embedded default: GRPO on GSM8K with SmolLM2-135M-Instruct.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py=$(bash "$root/scripts/setup_env.sh")
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
[ $# -gt 0 ] || set -- recipe=grpo_smollm2
cd "$root"
exec "$py" -m rl.launch "$@"
