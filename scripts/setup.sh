#!/usr/bin/env bash
# Creates .venv and installs the project into it; safe to run again (does nothing when
# nothing changed). Sourced by scripts/run.sh and scripts/test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.alexnet-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

# The built-in default data set: Fashion-MNIST from Debian's package (IDX files in
# /usr/share/datasets/fashion-mnist). Needs root and apt; skipped where either is missing.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian package dataset-fashion-mnist" >&2
        apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "setup: not root, so dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist)" >&2
    fi
fi

# The browser test of `alexnet serve`'s page (tests/test_serve.py) drives Debian's headless
# chromium with Selenium; without them it is skipped. Root and apt only, as above.
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } && command -v apt-get >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing Debian packages chromium chromium-driver" >&2
        # (only the browser test needs them, and Ubuntu names them otherwise: never fatal)
        { apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
            echo "setup: chromium not installed; the web page's browser test will be skipped" >&2
    else
        echo "setup: not root, so chromium is not installed (sudo apt-get install chromium chromium-driver)" >&2
    fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/alexnet" ]; then
    return 0 2>/dev/null || exit 0
fi
echo "setup: creating $venv" >&2
# Debian's and Ubuntu's python3 leaves venv's pip (ensurepip) to the package python3-venv
if ! python3 -c "import ensurepip" 2>/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package python3-venv" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq python3-venv >/dev/null
fi
python3 -m venv "$venv"
# torch first and exactly: the CPU build 2.13.0. A looser spelling can pull several GB of CUDA.
# Machines of this project's kind get the CPU build from pip's configured wheel folders; a
# machine whose pip reaches PyPI directly (where Linux wheels are CUDA builds) can say
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to have the CPU build from there.
"$venv/bin/python" -m pip install -q --disable-pip-version-check ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$root[test]"
echo "$want" > "$stamp"
