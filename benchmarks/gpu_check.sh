#!/usr/bin/env bash
# The GPU check on the lent (offline) machine, from the repository root:
#   1. install the wheels of .whl/ (benchmarks/gpu_wheels.sh made them) into a private
#      folder put on PYTHONPATH after the repository; if the carried versions do not import
#      together with the image's packages, keep only the wheels whose package the image lacks;
#   2. python -m benchmarks.gpu_check "$@" (results in benchmarks/results/gpu/);
#   3. where $OUT is set (the device tool), pack the results folder into $OUT.
# Wheels are installed only under Python 3.12 (what they were downloaded for).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run       # anywhere (CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
PY=${PYTHON:-python3}
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/holograd-site}

smoke() {
    "$PY" -c "import torch, lightning, transformers, torchmetrics, torchdata, lightning_holograd as h
print('[gpu_check.sh] imports ok: torch', torch.__version__, 'lightning', lightning.__version__,
      'transformers', transformers.__version__, 'from', h.__file__)"
}

install() {  # install the wheels named in "$@" into $SITE
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"
}

if ! ls "$WHL"/*.whl >/dev/null 2>&1; then
    echo "[gpu_check.sh] no wheels in $WHL: using the installed packages"
elif [ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 12))')" != True ]; then
    echo "[gpu_check.sh] $("$PY" -V): the wheels in $WHL are for Python 3.12; using the installed packages"
elif install "$WHL"/*.whl && PYTHONPATH="$PWD:$SITE" smoke; then
    export PYTHONPATH="$PWD:$SITE"
else
    echo "[gpu_check.sh] the carried versions fail to import: installing only what the image lacks"
    mapfile -t lacking < <("$PY" -m benchmarks.gpu_wheels --lacking "$WHL")
    if [ "${#lacking[@]}" -gt 0 ] && install "${lacking[@]}"; then
        export PYTHONPATH="$PWD:$SITE"
    fi
fi
smoke || echo "[gpu_check.sh] WARNING: the imports above fail; stages that need them will fail and say so"

"$PY" -m benchmarks.gpu_check "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
    results=benchmarks/results/gpu
    case " $* " in *" --dry-run "*) results=benchmarks/results/gpu_dry_run ;; esac
    tar czf "$OUT/gpu_results.tgz" "$results" && cp "$results/summary.md" "$OUT/summary.md"
    echo "[gpu_check.sh] packed $results into \$OUT/gpu_results.tgz ($(du -h "$OUT/gpu_results.tgz" | cut -f1))"
fi
exit $rc
