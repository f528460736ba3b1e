#!/usr/bin/env bash
# Installs what is needed (once), then runs the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py=$(bash "$root/scripts/setup_env.sh")
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$py" -m pytest -q --durations=30 "$@"
