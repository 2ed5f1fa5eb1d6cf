#!/usr/bin/env bash
# Wheels for the offline GPU machine (Python 3.12, manylinux x86_64; it has its own CUDA
# torch): the package's dependencies at the versions installed here (benchmarks/gpu_wheels.py
# says which), and the package's own wheel, into .whl/ at the repository root (git-ignored).
# A device run carries them with carry=[".whl"]; benchmarks/gpu_check.sh installs them.
#
#   bash benchmarks/gpu_wheels.sh            # needs network (PyPI), not a GPU
#   bash benchmarks/gpu_wheels.sh /tmp/whl   # another folder
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
LIMIT_MB=40  # the device's working-tree limit is 64 MiB, repository included

pins=$(PYTHONPATH="$PWD" "$PY" -m benchmarks.gpu_wheels)
rm -rf "$DEST"
mkdir -p "$DEST"
# shellcheck disable=SC2086  # one argument per pin
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" $pins
had_build=$([ -e build ] && echo 1 || echo 0)
"$PY" -m pip wheel -q --no-deps -w "$DEST" . || "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" .
[ "$had_build" = 1 ] || rm -rf build  # setuptools' scratch folder, unless it was there before

count=$(ls "$DEST"/*.whl | wc -l)
size_mb=$(du -sm "$DEST" | cut -f1)
echo "[gpu_wheels] $count wheels, ${size_mb} MB in $DEST"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
    echo "[gpu_wheels] ${size_mb} MB is over ${LIMIT_MB} MB: with the repository it may not fit the device's" \
         "64 MiB. HINT: move more packages to IMAGE_BASE in benchmarks/gpu_wheels.py." >&2
    exit 1
fi
