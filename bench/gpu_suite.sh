#!/usr/bin/env bash
# The GPU check: bench/gpu_suite.py's stages, from the repository root (see its docstring).
#   bash bench/gpu_suite.sh            # on a GPU machine; results in $OUT (or ./gpu-out)
#   bash bench/gpu_suite.sh --smoke    # on any CPU: tiny sizes, GPU-only parts SKIPPED
# $PYTHON picks the interpreter (default python3: on the GPU machine, the one that holds torch).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" bench/gpu_suite.py "$@"
