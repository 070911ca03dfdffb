#!/usr/bin/env bash
# Installs jaxdiff with its test extra into the active Python and runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# A CPU build of torch, explicitly and first: a bare `torch` requirement would pull CUDA.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
export NO_GCE_CHECK=true JAX_PLATFORMS=cpu
python -m pytest -n 2 -q "$@"
