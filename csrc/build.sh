#!/usr/bin/env bash
# Build the optional native CPU ops (CMakeLists.txt) against the torch of the active Python.
# Usage: csrc/build.sh [python]   → build/native/libprivimage_native.so
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${1:-python}"
PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S . -B build/native -DCMAKE_PREFIX_PATH="$PREFIX" -DCMAKE_BUILD_TYPE=Release
cmake --build build/native -j"$(nproc)"
ls -l build/native/libprivimage_native.so
