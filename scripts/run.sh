#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job: training on the built-in default data
# (Fashion-MNIST) for about 3 to 11 minutes on a 2-core CPU (by its speed), ending with the
# test-set figures. Extra arguments go to the command.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/setup.sh"
# (no cd: relative paths in the arguments, and the default runs/ folder, are the caller's)
exec "$root/.venv/bin/alexnet" train "$@"
