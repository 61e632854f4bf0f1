#!/usr/bin/env bash
# Sets up .venv if needed, then runs the test suite. Extra arguments go to pytest;
# `--slow` runs the slow tests instead of the default ones.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
if [ "${1:-}" = "--slow" ]; then
    shift
    exec "$root/.venv/bin/python" -m pytest -m slow "$@"
fi
exec "$root/.venv/bin/python" -m pytest "$@"
