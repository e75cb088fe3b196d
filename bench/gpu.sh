#!/usr/bin/env bash
# GPU bring-up in one call of the device tool (issue 16): deadline-driven, results kept when cut short.
#
# Steps, in this fixed order, each under its own `timeout` derived from what is left of --budget
# (at most its share of the budget, less the minimum time kept for the correctness steps after it):
#   env          nvidia-smi, versions (torch, CUDA, Triton, transformers, nvcc, compute-sanitizer),
#                commit (git, else $VQDNA_COMMIT) and a hash of the source tree
#   build        VQDNA_BUILD_CUDA=1 VQDNA_CUDA_ARCHS=<this GPU's major.minor> MAX_JOBS=$(nproc)
#                python3 setup.py build_ext --inplace (no pip, no download), then import check
#   smoke-*      bench/gpu_smoke.py: every CUDA and Triton path against the reference on small awkward
#                shapes, one process per backend (a CUDA fault in one leaves the other's results)
#   memcheck, racecheck   compute-sanitizer over gpu_smoke.py --backends cuda --small
#   tests        pytest -m cuda tests -k "not triton-cuda" (the CUDA backend; no -x; junit tests.xml)
#   timings      bench/gpu_timings.py: the issue's timed points with the limits measured in the run
#   tests-triton pytest -m cuda tests -k triton-cuda (Triton on the GPU: autotuning compiles, slow)
#   suite        the bench suite (pytest bench -m cuda, --size), then backend_table.json from it
# Results (at most 8 files, under --results): results.jsonl (one JSON line per step, smoke case,
# test, timed point and suite point, appended as each ends), summary.json + summary.md (rewritten
# after every step), log.txt (every step's output), tests.xml, <gpu>-<date>.json/.md (the suite) and
# backend_table.json (the packaged table with this GPU's measured winners; copy it to vqdna/kernels/).
# Anything more is packed into extras.tar.gz.
#
# Usage: bench/gpu.sh [--budget SECONDS] [--device cuda|cpu] [--results DIR] [--dry-run] [--quick]
#                     [--size tiny|small|full] [--select PYTEST_K_EXPR] [--skip-build] [--skip-smoke]
#                     [--skip-sanitizer] [--skip-tests] [--skip-timings] [--skip-suite]
#   --budget    seconds for the whole run, the summary included (default 540: a 560 s device call)
#   --results   default $OUT when set (the device tool brings back what is there), else
#               bench/results/gpu-run-<UTC time>; must not hold an earlier results.jsonl
#   --device cpu  the same pipeline on the CPU (no build, no sanitizer, native/reference smoke, quick
#               timings, tests skip, tiny CPU suite): a check of the script
#   --dry-run   print the steps, their timeouts and commands with the detected device; run nothing
#   --quick     small smoke shapes and timing sizes (default with --device cpu)
#   --size, --select   the suite's case grid and pytest -k (default full on cuda, tiny on cpu)
# Env: PYTHON (default python3: the device machine's python3 holds torch), MAX_JOBS (default nproc),
#      VQDNA_CUDA_ARCHS / VQDNA_BENCH_DEVICE_NAME (replace the detected architecture / device name),
#      VQDNA_COMMIT (recorded when the checkout has no .git), VQDNA_GPU_RESERVE (seconds kept for the
#      summary, default 10), VQDNA_SMOKE_ARGS / VQDNA_TIMINGS_ARGS / VQDNA_TESTS_ARGS (extra arguments).
# Exit status: 0 when every step that ran passed (a timeout of tests-triton or suite, the steps that
# take what is left, does not count), else the first failing step's status (later steps still run).
set -uo pipefail
set -f  # no pathname expansion: VQDNA_*_ARGS may hold globs for --only

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=cuda
SIZE=""
RESULTS=""
DRY=0
QUICK=""
BUDGET=540
SELECT=""
declare -A SKIP=()
while [ $# -gt 0 ]; do
    case "$1" in
        --budget) BUDGET=${2:-}; shift ;;
        --dry-run) DRY=1 ;;
        --device) DEVICE=${2:-}; shift ;;
        --size) SIZE=${2:-}; shift ;;
        --results) RESULTS=${2:-}; shift ;;
        --quick) QUICK=1 ;;
        --select) SELECT=${2:-}; shift ;;
        --skip-build|--skip-smoke|--skip-sanitizer|--skip-tests|--skip-timings|--skip-suite) SKIP[${1#--skip-}]=1 ;;
        -h|--help) sed -n '2,41p' "$0"; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$DEVICE" in cuda|cpu) ;; *) echo "bench/gpu.sh: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
[ -n "$SIZE" ] || { [ "$DEVICE" = cuda ] && SIZE=full || SIZE=tiny; }
case "$SIZE" in tiny|small|full) ;; *) echo "bench/gpu.sh: --size must be tiny, small or full, got $SIZE" >&2; exit 2 ;; esac
case "$BUDGET" in ''|*[!0-9]*) echo "bench/gpu.sh: --budget must be a whole number of seconds, got '$BUDGET'" >&2; exit 2 ;; esac
[ -n "$QUICK" ] || { [ "$DEVICE" = cpu ] && QUICK=1 || QUICK=0; }
RESULTS=${RESULTS:-${OUT:-bench/results/gpu-run-$(date -u +%Y%m%d-%H%M%S)}}
if [ "$DRY" = 0 ] && [ -e "$RESULTS/results.jsonl" ]; then
    echo "bench/gpu.sh: $RESULTS already holds a run's results.jsonl: give an empty --results folder" >&2
    exit 2
fi

T0=$SECONDS
RESERVE=${VQDNA_GPU_RESERVE:-10}  # the summary and the file check at the end
GRACE=5                           # timeout's SIGINT -> SIGKILL delay, counted in each step's time
MIN_STEP=5                        # a step with less time than this is recorded as skipped
JSONL="$RESULTS/results.jsonl"
LOG="$RESULTS/log.txt"
TMPD=$(mktemp -d "${TMPDIR:-/tmp}/vqdna-gpu.XXXXXX")
trap 'rm -rf "$TMPD"' EXIT
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, without installing
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$TMPD/triton-cache}  # never under $OUT (file limit)
if [ "$DEVICE" = cuda ]; then
    unset TRITON_INTERPRET  # real Triton on the GPU (the interpreter is the CPU CI's)
    SMOKE_GROUPS="cuda,auto triton"
    TIMING_BACKENDS="cuda,triton"
else
    SMOKE_GROUPS="native,reference,auto"
    [ -n "${TRITON_INTERPRET:-}" ] && [ "${TRITON_INTERPRET}" != 0 ] && SMOKE_GROUPS="$SMOKE_GROUPS triton"
    TIMING_BACKENDS="native"
    SKIP[build]=1
    SKIP[sanitizer]=1
fi
QUICK_ARG=""
[ "$QUICK" = 1 ] && QUICK_ARG="--quick"
XDIST=""
if [ "$DEVICE" = cuda ] && [ "$DRY" = 0 ] && "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi

# --- one step: its timeout from what is left, its output to log.txt, its outcome as a JSON line ----
# Per step: share of the budget it may take (cap, %) and time kept for it while earlier steps run (floor, %).
STEPS=(env build smoke memcheck racecheck tests timings tests-triton suite table)
declare -A CAP=([env]=5 [build]=45 [smoke]=30 [memcheck]=10 [racecheck]=8 [tests]=15 [timings]=30 [tests-triton]=100 [suite]=100 [table]=5)
declare -A FLOOR=([env]=0 [build]=0 [smoke]=10 [memcheck]=4 [racecheck]=3 [tests]=4 [timings]=8 [tests-triton]=0 [suite]=8 [table]=1)
declare -A MINCAP=([env]=60 [table]=20)  # seconds, whatever the budget (torch's import alone takes some)
declare -A GROUP=([memcheck]=sanitizer [racecheck]=sanitizer [tests-triton]=tests [table]=suite)
STATUS=0
STEP_TIMEOUT=0
STEP_END=0
SUB_TIMEOUT=""

json_str() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' | tr -d '\n\r\t'; }

record_step() {  # name status seconds timeout timed_out [skipped-reason] [note]
    [ "$DRY" = 1 ] && return 0
    local extra=""
    [ -n "${6:-}" ] && extra=", \"skipped\": \"$(json_str "$6")\""
    [ -n "${7:-}" ] && extra="$extra, \"note\": \"$(json_str "$7")\""
    printf '{"kind": "step", "step": "%s", "status": %s, "seconds": %s, "timeout_s": %s, "timed_out": %s, "at_s": %s%s}\n' \
        "$1" "$2" "$3" "$4" "$5" "$((SECONDS - T0))" "$extra" >> "$JSONL"
}

summarize() {
    [ "$DRY" = 1 ] && return 0
    "$PY" bench/gpu_summary.py "$RESULTS" >> "$LOG" 2>&1 || echo "bench/gpu.sh: the summary failed (see log.txt)" >&2
}

floors_after() {  # seconds kept for the enabled steps after step $1
    local seen=0 sum=0 s
    for s in "${STEPS[@]}"; do
        if [ "$seen" = 1 ] && [ -z "${SKIP[$s]:-}" ] && [ -z "${SKIP[${GROUP[$s]:-none}]:-}" ]; then
            sum=$((sum + BUDGET * FLOOR[$s] / 100))
        fi
        [ "$s" = "$1" ] && seen=1
    done
    echo "$sum"
}

show() {  # the command as one could paste it (an inline script shown as <script>)
    local a out="+"
    for a in "$@"; do
        case "$a" in
            *$'\n'*) out="$out <script>" ;;
            *[!A-Za-z0-9_.,:/=+@%-]*|'') out="$out $(printf '%q' "$a")" ;;
            *) out="$out $a" ;;
        esac
    done
    echo "$out"
}

tmo() {  # run one command of a step under what is left of the step's time, or SUB_TIMEOUT if less
    # (SIGINT first: Python unwinds, pytest still writes its junit and summary; SIGKILL GRACE s later)
    show "$@"
    [ "$DRY" = 1 ] && return 0
    local t=$((STEP_END - SECONDS))
    [ -n "${SUB_TIMEOUT:-}" ] && [ "$SUB_TIMEOUT" -lt "$t" ] && t=$SUB_TIMEOUT
    [ "$t" -ge 1 ] || t=1
    timeout -s INT -k "$GRACE" "$t" "$@"
}

run_step() {  # name function [args...]
    local name=$1; shift
    if [ -n "${SKIP[$name]:-}" ] || [ -n "${SKIP[${GROUP[$name]:-none}]:-}" ]; then
        echo "=== $name: skipped"
        record_step "$name" null 0 0 false "skipped (--skip-${GROUP[$name]:-$name} or not on $DEVICE)"
        return 0
    fi
    local left=$((BUDGET - (SECONDS - T0) - RESERVE - GRACE - $(floors_after "$name")))
    local cap=$((BUDGET * CAP[$name] / 100))
    [ "$cap" -ge "${MINCAP[$name]:-0}" ] || cap=${MINCAP[$name]}
    STEP_TIMEOUT=$((left < cap ? left : cap))
    if [ "$STEP_TIMEOUT" -lt "$MIN_STEP" ]; then
        echo "=== $name: no time left (${STEP_TIMEOUT} s)"
        record_step "$name" null 0 0 false "no time left in the budget"
        return 0
    fi
    echo "=== $name: timeout ${STEP_TIMEOUT} s, at $((SECONDS - T0)) s of $BUDGET" | { [ "$DRY" = 1 ] && cat || tee -a "$LOG"; }
    if [ "$DRY" = 1 ]; then "$@"; return 0; fi
    local t1=$SECONDS
    STEP_END=$((SECONDS + STEP_TIMEOUT))
    : > "$TMPD/step.log"
    "$@" 2>&1 | tee -a "$LOG" "$TMPD/step.log"
    local rc=${PIPESTATUS[0]}
    local timed_out=false
    { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && timed_out=true
    local note=""
    case "$name" in
        memcheck|racecheck)  # the summary line, or (cut short) the reports printed so far
            note=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$TMPD/step.log" | tail -1)
            [ -n "$note" ] || note="no ERROR SUMMARY; $(grep -c -E '^========= (Invalid|Race|Error|Program hit|.*[Hh]azard)' "$TMPD/step.log") error reports" ;;
    esac
    echo "    ($name: status $rc, $((SECONDS - t1)) s${note:+, $note})" | tee -a "$LOG"
    record_step "$name" "$rc" "$((SECONDS - t1))" "$STEP_TIMEOUT" "$timed_out" "" "$note"
    if [ "$rc" != 0 ] && [ "$STATUS" = 0 ]; then
        case "$name" in tests-triton|suite) [ "$timed_out" = true ] || STATUS=$rc ;; *) STATUS=$rc ;; esac
    fi
    summarize
    return 0
}

# --- the steps ---------------------------------------------------------------------------------------
step_env() {
    {
        date -u
        if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
        command -v nvcc >/dev/null && nvcc --version | tail -2
        command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2
        command -v ninja >/dev/null && echo "ninja $(ninja --version)"
        echo "nproc $(nproc)"; grep -E 'MemTotal|MemAvailable' /proc/meminfo
    } 2>&1
    local detect='import json, os, platform, subprocess, sys, hashlib, datetime
import torch
info = {"kind": "env", "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": os.environ.get("VQDNA_GPU_COMMAND")}
for mod in ("triton", "transformers", "peft"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = f"unavailable: {exc}"
dev = os.environ["VQDNA_GPU_DEVICE"]
if dev == "cuda" and torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    p = torch.cuda.get_device_properties(0)
    info.update(device=torch.cuda.get_device_name(), capability=f"{major}.{minor}", sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
elif dev == "cpu":
    from vqdna.kernels.dispatch import device_name
    info["device"] = device_name("cpu")
try:
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except (OSError, IndexError):
    info["nvcc"] = None
try:
    info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
except (OSError, subprocess.CalledProcessError):
    info["commit"] = os.environ.get("VQDNA_COMMIT") or None
h = hashlib.sha256()  # the sources that ran, for when the copy has no .git
for root in ("csrc", "vqdna", "bench", "setup.py"):
    paths = [root] if os.path.isfile(root) else sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                                                         if f.endswith((".py", ".cpp", ".cu", ".cuh", ".h", ".sh", ".json")))
    for path in paths:
        h.update(path.encode() + b"\0" + open(path, "rb").read())
info["tree_sha256"] = h.hexdigest()
with open(os.environ["VQDNA_GPU_JSONL"], "a") as f:
    f.write(json.dumps(info) + "\n")
print(json.dumps(info))
with open(os.environ["VQDNA_GPU_DEVFILE"], "w") as f:
    f.write((info.get("device") or "") + "|" + (info.get("capability") or "") + "\n")'
    VQDNA_GPU_DEVICE=$DEVICE VQDNA_GPU_JSONL=$JSONL VQDNA_GPU_DEVFILE=$TMPD/device VQDNA_GPU_COMMAND="bench/gpu.sh $ARGS" \
        tmo "$PY" -c "$detect"
}

step_build() {
    tmo env VQDNA_BUILD_CUDA=1 VQDNA_CUDA_ARCHS="$ARCH" TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$PY" setup.py build_ext --inplace || return $?
    tmo "$PY" -c "import vqdna._ext as e; assert e.extension_available() and e.cuda_ops_available(), 'vqdna._C has no CUDA ops'; print('vqdna._C: CUDA ops built')"
}

step_smoke() {  # one process per backend group: the first (the CUDA kernels: no compiles) gets at most a
    # third of the step, the last what is left
    local n=0 g r rc=0
    for g in $SMOKE_GROUPS; do n=$((n + 1)); done
    for g in $SMOKE_GROUPS; do
        n=$((n - 1))
        SUB_TIMEOUT=""
        [ "$n" -gt 0 ] && SUB_TIMEOUT=$((STEP_TIMEOUT / 3))
        # shellcheck disable=SC2086
        tmo "$PY" bench/gpu_smoke.py --device "$DEVICE" --backends "$g" $QUICK_ARG --jsonl "$JSONL" \
            --tag "smoke-${g//,/+}" ${VQDNA_SMOKE_ARGS:-}
        r=$?
        [ "$rc" = 0 ] && rc=$r
    done
    SUB_TIMEOUT=""
    return "$rc"
}

step_sanitizer() {  # memcheck | racecheck: the CUDA kernels on small shapes
    # shellcheck disable=SC2086
    tmo compute-sanitizer --tool "$1" --error-exitcode 99 --print-limit 30 \
        "$PY" bench/gpu_smoke.py --device cuda --backends cuda --small --jsonl "$JSONL" --tag "$1" ${VQDNA_SMOKE_ARGS:-}
}

step_tests() {  # tests | tests-triton
    local k="not triton-cuda" junit="--junitxml=$RESULTS/tests.xml"
    [ "$1" = tests-triton ] && k="triton-cuda" && junit=""
    # shellcheck disable=SC2086
    VQDNA_TESTS_JSONL=$JSONL VQDNA_TESTS_TAG=$1 tmo "$PY" -m pytest -q -m cuda tests -k "$k" -p no:cacheprovider \
        -p bench.pytest_jsonl $XDIST $junit -o junit_family=xunit2 --durations=15 ${VQDNA_TESTS_ARGS:-}
}

step_timings() {
    # shellcheck disable=SC2086
    tmo "$PY" bench/gpu_timings.py --device "$DEVICE" --backends "$TIMING_BACKENDS" $QUICK_ARG --jsonl "$JSONL" \
        --tag timings ${VQDNA_TIMINGS_ARGS:-}
}

step_suite() {
    local ksel=()
    [ -n "$SELECT" ] && ksel=(-k "$SELECT")
    VQDNA_RESULTS_JSONL=$JSONL tmo "$PY" -m pytest bench -q -m "$DEVICE" -p no:cacheprovider --vqdna-size "$SIZE" \
        --vqdna-results "$STEM.json" --benchmark-columns=min,median,rounds "${ksel[@]}"
}

step_table() {  # the packaged table with this run's winners (copy it to vqdna/kernels/ to ship it)
    if [ "$DRY" = 0 ] && [ ! -f "$STEM.json" ]; then echo "no $STEM.json: the suite wrote none"; return 1; fi
    tmo cp vqdna/kernels/backend_table.json "$RESULTS/backend_table.json" || return $?
    tmo "$PY" -m vqdna.cli bench --from-json "$STEM.json" --write-table "$RESULTS/backend_table.json"
}

keep_eight_files() {  # the device tool brings back 8 files: pack anything beyond the known ones
    [ "$DRY" = 1 ] && return 0
    local keep=(summary.json summary.md results.jsonl log.txt tests.xml "$(basename "$STEM").json" "$(basename "$STEM").md" backend_table.json)
    local all extra=() f k known
    mapfile -t all < <(cd "$RESULTS" && find . -type f | sed 's|^\./||' | sort)
    [ "${#all[@]}" -le 8 ] && return 0
    for f in "${all[@]}"; do
        known=0
        for k in "${keep[@]}"; do [ "$f" = "$k" ] && known=1; done
        [ "$known" = 0 ] && extra+=("$f")
    done
    echo "bench/gpu.sh: ${#all[@]} files under $RESULTS; packing ${extra[*]} into extras.tar.gz" | tee -a "$LOG"
    (cd "$RESULTS" && tar czf "$TMPD/extras.tar.gz" -- "${extra[@]}" && rm -f -- "${extra[@]}" && mv "$TMPD/extras.tar.gz" extras.tar.gz)
    find "$RESULTS" -mindepth 1 -type d -empty -delete
}

# --- the run -------------------------------------------------------------------------------------------
ARGS="--budget $BUDGET --device $DEVICE --size $SIZE${SELECT:+ --select '$SELECT'}"
[ "$DRY" = 1 ] || mkdir -p "$RESULTS"
[ "$DRY" = 1 ] || : > "$LOG"
echo "bench/gpu.sh: device $DEVICE, budget $BUDGET s, results $RESULTS" | { [ "$DRY" = 1 ] && cat || tee -a "$LOG"; }

NAME=${VQDNA_BENCH_DEVICE_NAME:-}
ARCH=${VQDNA_CUDA_ARCHS:-}
if [ "$DRY" = 1 ] && [ -n "$NAME" ]; then
    echo "=== env: (dry run, device named by VQDNA_BENCH_DEVICE_NAME)"
else
    run_step env step_env
    if [ -f "$TMPD/device" ]; then
        IFS='|' read -r DNAME DARCH < "$TMPD/device"
        NAME=${NAME:-$DNAME}
        ARCH=${ARCH:-$DARCH}
    fi
fi
if [ "$DEVICE" = cuda ] && [ -z "$ARCH" ]; then
    if [ "$DRY" = 1 ]; then
        NAME=${NAME:-no-gpu-visible}; ARCH="<from the GPU>"
    else
        echo "bench/gpu.sh: torch sees no CUDA device (use --device cpu to check the script on the CPU)" | tee -a "$LOG" >&2
        record_step done 1 0 0 false "" "no CUDA device"
        summarize
        exit 1
    fi
fi
SLUG=$(printf '%s' "${NAME:-unknown}" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
STEM="$RESULTS/${SLUG:-unknown}-$(date -u +%Y%m%d)"
echo "bench/gpu.sh: '$NAME' arch '${ARCH:-n/a}', suite results $STEM.json" | { [ "$DRY" = 1 ] && cat || tee -a "$LOG"; }

run_step build step_build
run_step smoke step_smoke
run_step memcheck step_sanitizer memcheck
run_step racecheck step_sanitizer racecheck
run_step tests step_tests tests
run_step timings step_timings
run_step tests-triton step_tests tests-triton
run_step suite step_suite
run_step table step_table

record_step done "$STATUS" "$((SECONDS - T0))" "$BUDGET" false
summarize
keep_eight_files
summarize
echo "bench/gpu.sh: done in $((SECONDS - T0)) s, status $STATUS; results in $RESULTS (summary.md first)" | { [ "$DRY" = 1 ] && cat || tee -a "$LOG"; }
[ "$DRY" = 1 ] || cat "$RESULTS/summary.md" 2>/dev/null  # the device tool returns the end of stdout
exit "$STATUS"
