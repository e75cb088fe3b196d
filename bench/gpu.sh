#!/usr/bin/env bash
# GPU verification in one command, sized for one call of the device tool (<= 10 min, results under
# $OUT, at most 8 files back):
#   1. build vqdna._C in place with its CUDA ops for this GPU's architecture
#      (VQDNA_BUILD_CUDA=1, VQDNA_CUDA_ARCHS from torch.cuda.get_device_capability())
#   2. run every CUDA-marked test (pytest -m cuda tests)
#   3. run the benchmark suite on the device (pytest bench -m cuda)
#   4. write <results>/<gpu>-<date>.json and .md (device, torch, triton, commit, command, results),
#      a throughput plot, the test and suite logs, and backend_table.json: the packaged measured
#      backend table with this GPU's winners added (copy it to vqdna/kernels/ to ship it).
# Usage: bench/gpu.sh [--dry-run] [--device cuda|cpu] [--size tiny|small|full] [--results DIR]
#                     [--skip-build] [--skip-tests] [--select PYTEST_K_EXPR]
#   --results  default: $OUT when set (the device tool brings back what is there), else bench/results
#   --device cpu  runs the same pipeline on the CPU (no build, CPU-marked suite): a check of the script
#   --dry-run  print the steps with the detected device, run nothing
# Env: PYTHON (default python3; the device machine's python3 holds torch), MAX_JOBS (nvcc jobs),
#      VQDNA_CUDA_ARCHS / VQDNA_BENCH_DEVICE_NAME (replace the detected architecture / device name).
# Exit status: 0 when every step passed, else the first failing step's status (all steps still run).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=cuda
SIZE=full
RESULTS=${OUT:-bench/results}
DRY=0
BUILD=1
TESTS=1
SELECT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --device) DEVICE=$2; shift ;;
        --size) SIZE=$2; shift ;;
        --results) RESULTS=$2; shift ;;
        --skip-build) BUILD=0 ;;
        --skip-tests) TESTS=0 ;;
        --select) SELECT=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$DEVICE" in cuda|cpu) ;; *) echo "bench/gpu.sh: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
case "$SIZE" in tiny|small|full) ;; *) echo "bench/gpu.sh: --size must be tiny, small or full, got $SIZE" >&2; exit 2 ;; esac

# The device: its name (results file name and table key) and, for a GPU, its architecture.
if [ "$DEVICE" = cuda ]; then
    DETECT='import torch
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(torch.cuda.get_device_name() + "|" + f"{major}.{minor}")
else:
    print("|")'
else
    DETECT='from vqdna.kernels.dispatch import device_name
print(device_name("cpu") + "|")'
fi
if [ -n "${VQDNA_BENCH_DEVICE_NAME:-}" ]; then
    INFO="$VQDNA_BENCH_DEVICE_NAME|"
else
    INFO=$($PY -c "$DETECT") || { echo "bench/gpu.sh: $PY cannot detect the device" >&2; exit 1; }
fi
NAME=${INFO%%|*}
ARCH=${VQDNA_CUDA_ARCHS:-${INFO#*|}}
if [ "$DEVICE" = cuda ] && [ -z "$NAME" ]; then
    if [ "$DRY" = 1 ]; then
        NAME="no-gpu-visible"; ARCH="<from the GPU>"
    else
        echo "bench/gpu.sh: torch sees no CUDA device (use --device cpu to check the script on the CPU)" >&2
        exit 1
    fi
fi
SLUG=$(printf '%s' "$NAME" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
DATE=$(date -u +%Y%m%d)
STEM="$RESULTS/$SLUG-$DATE"
MARK=$DEVICE

run() {  # one step: print it, run it unless --dry-run, remember the first failure
    echo "+ $*"
    [ "$DRY" = 1 ] && return 0
    local t0=$SECONDS
    "$@"
    local rc=$?
    echo "  (step status $rc, $((SECONDS - t0)) s)"
    if [ $rc -ne 0 ] && [ "$STATUS" -eq 0 ]; then STATUS=$rc; fi
    return 0
}
STATUS=0

echo "bench/gpu.sh: device $DEVICE '$NAME' arch '${ARCH:-n/a}', size $SIZE, results $STEM.{json,md}"
[ "$DRY" = 1 ] || mkdir -p "$RESULTS"
unset TRITON_INTERPRET  # real Triton on the GPU (the interpreter is the CPU CI's)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, without installing

if [ "$BUILD" = 1 ] && [ "$DEVICE" = cuda ]; then
    run env VQDNA_BUILD_CUDA=1 VQDNA_CUDA_ARCHS="$ARCH" "$PY" setup.py -q build_ext --inplace
    run "$PY" -c "import vqdna._ext as e; assert e.extension_available() and e.cuda_ops_available(), 'vqdna._C has no CUDA ops'"
fi

if [ "$TESTS" = 1 ]; then
    # Every CUDA-marked test (with --device cpu they skip: a check of the step). tee keeps the log;
    # pipefail gives pytest's status.
    run bash -o pipefail -c "$PY -m pytest -q -m cuda tests -p no:cacheprovider --junitxml='$RESULTS/tests-$SLUG.xml' 2>&1 | tee '$RESULTS/tests-$SLUG.log'"
fi

KSEL=""
[ -n "$SELECT" ] && KSEL="-k '$SELECT'"
run bash -o pipefail -c "$PY -m pytest bench -q -m $MARK -p no:cacheprovider --vqdna-size $SIZE --vqdna-results '$STEM.json' --benchmark-columns=min,median,rounds $KSEL 2>&1 | tee '$RESULTS/suite-$SLUG.log'"

if [ "$DRY" = 1 ] || [ -f "$STEM.json" ]; then
    run cp vqdna/kernels/backend_table.json "$RESULTS/backend_table.json"
    run "$PY" -m vqdna.cli bench --from-json "$STEM.json" --plot "$STEM.png" --write-table "$RESULTS/backend_table.json"
else
    echo "bench/gpu.sh: the suite wrote no $STEM.json" >&2
    [ "$STATUS" -eq 0 ] && STATUS=1
fi

echo "bench/gpu.sh: done, status $STATUS; results in $RESULTS"
exit $STATUS
