#!/usr/bin/env bash
# The prepared GPU check (issue 11): figures of the GPU path, then the tests marked `gpu`.
# Needs no download and no Ray: python3 with torch, torchvision, numpy, safetensors, pyarrow,
# typer, pillow and pytest. Under 5 minutes on one H100/H200.
#   benchmarks/gpu_check.sh                     # on the GPU machine
#   benchmarks/gpu_check.sh --device cpu --tiny # here: checks the logic, reports no GPU figure
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
"$PY" benchmarks/gpu_check.py "$@"
if [[ " $* " != *" --device cpu "* ]]; then
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py
fi
