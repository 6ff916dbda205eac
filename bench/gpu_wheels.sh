#!/usr/bin/env bash
# The wheels the GPU machine lacks, for bench/gpu_suite.sh, downloaded HERE (the machine has no network) into
# the ignored folder .whl/ that the device call carries (`carry: [".whl"]`). Run from anywhere in the repo:
#   bash bench/gpu_wheels.sh [NAME==VERSION ...]      # extra names are added to the list below
# Python 3.12, manylinux x86_64, binary wheels only, no dependencies pulled: the machine's image already has
# torch, triton and the nvidia-* libraries (never carried) and numpy, scipy, absl-py, attrs, mpmath, wrapt,
# opt-einsum, pytest, pytest-benchmark, hypothesis, safetensors and tqdm (/work/.library/device/KINDS.md), so
# only these travel (the versions the CPU environment is tested with). .whl/SOURCE records the commit, so
# results made on a copy of the tree without .git still say where they came from.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(opacus==1.6.0 prv-accountant==0.2.0 dp-accounting==0.6.0 dm-tree==0.1.10 "$@")
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
rm -rf .whl
mkdir .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
echo "$(git describe --always --dirty --abbrev=7 --exclude '*' 2>/dev/null || echo unknown) $(date -u +%FT%TZ)" \
    > .whl/SOURCE
git check-ignore -q .whl || echo "warning: .whl/ is not ignored by git; add /.whl/ to .gitignore" >&2
ls -1 .whl
du -sh .whl | awk '{print "size of .whl/: " $1 " (the device call carries at most 64 MiB)"}'
