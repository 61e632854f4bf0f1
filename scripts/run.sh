#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job on its built-in default. Extra arguments
# go to the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/alexnet" summary "$@"
