#!/usr/bin/env bash
# Installs jaxdiff with its test extra into the active Python and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned to the CPU build these machines' pip has on disk (a bare `torch`
# requirement would pull a CUDA build; elsewhere add --index-url https://download.pytorch.org/whl/cpu).
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
export NO_GCE_CHECK=true JAX_PLATFORMS=cpu
python -m pytest -n 2 -q "$@"
