#!/usr/bin/env bash
# GPU checks and benchmarks in one go, for a machine with CUDA (an H100/H200: under 8 minutes).
#
#   bash bench/run_gpu.sh [RESULTS_DIR]
#
# Writes into RESULTS_DIR (default bench/results/<device>-<UTC date>/): env.txt (nvidia-smi,
# versions), one log per stage, stages.tsv (stage, exit code, seconds), tests.xml (JUnit),
# bench_*.json (pytest-benchmark format) and the report (PNGs, summary.md, summary.csv).
# Every stage runs under `timeout` and the script goes on when one fails; it exits 1 if any
# stage failed. Kernels are compiled (TRITON_INTERPRET is unset). Nothing is installed: the
# package is imported from this checkout through a PYTHONPATH shim that maps kernels/ to
# empf_triton.kernels as the wheel does.
#
# Environment: PYTHON (default python3); EMPF_COMMIT (commit id to record when the tree has no
# .git); EMPF_GPU_BUDGET_S (default 465: later stages get only what is left of it);
# EMPF_RESULTS_TAR (also pack the results folder into this .tar.gz, e.g. for a remote runner
# that returns only a few files); EMPF_GPU_TESTS (test paths, default "tests"); EMPF_BENCH_*
# (see bench/conftest.py). EMPF_GPU_ALLOW_CPU=1 lets the script run without CUDA, only to try
# the script itself (with small EMPF_BENCH_N / EMPF_BENCH_T and EMPF_GPU_TESTS).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
T_START=$SECONDS
BUDGET=${EMPF_GPU_BUDGET_S:-465}
REPORT_RESERVE=30

unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
if [ -z "${EMPF_COMMIT:-}" ]; then
    EMPF_COMMIT=$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
    if [ "$EMPF_COMMIT" != unknown ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
        EMPF_COMMIT="$EMPF_COMMIT+dirty"
    fi
fi
export EMPF_COMMIT

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    DEVICE=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" | tr -c 'A-Za-z0-9._\n-' '-')
elif [ "${EMPF_GPU_ALLOW_CPU:-0}" = 1 ]; then
    DEVICE=cpu
else
    echo "run_gpu.sh: torch sees no CUDA device; this script is for GPU machines" >&2
    exit 2
fi
RESULTS=${1:-bench/results/${DEVICE}-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG="$RESULTS/run.log"
printf 'stage\texit\tseconds\tlimit\n' >"$RESULTS/stages.tsv"
FAILED=0

log() { echo "$*" | tee -a "$LOG"; }

# Import the package from this checkout without installing it: a folder whose empf_triton/ links
# every entry of ./empf_triton plus kernels/ as empf_triton/kernels.
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/empf_triton"
for entry in "$ROOT"/empf_triton/*; do
    ln -s "$entry" "$SHIM/empf_triton/$(basename "$entry")"
done
ln -s "$ROOT/kernels" "$SHIM/empf_triton/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"

has_module() { "$PY" -c "import $1" >/dev/null 2>&1; }

# stage NAME LIMIT_S CMD...: run CMD under timeout (clamped to the budget left), log to NAME.log.
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - REPORT_RESERVE - (SECONDS - T_START)))
    [ "$name" = report ] && left=$((BUDGET - (SECONDS - T_START)))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        log "== $name: skipped (budget spent)"
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$RESULTS/stages.tsv"
        FAILED=1
        return 0
    fi
    log "== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$limit" >>"$RESULTS/stages.tsv"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && log "   TIMED OUT"
    log "   exit $rc after ${dt}s; last lines:"
    tail -n 4 "$RESULTS/$name.log" | sed 's/^/   | /' | tee -a "$LOG"
    [ "$rc" -eq 0 ] || FAILED=1
    return 0
}

env_info() {  # runs in its own bash under `timeout` (exported with export -f)
    echo "date (UTC): $(date -u +%FT%TZ)"
    echo "commit: $EMPF_COMMIT"
    echo "host: $(uname -a)"
    echo
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    echo
    "$PY" - <<'EOF'
import importlib.metadata as md
import os, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(), f"sm_{p.major}{p.minor}",
          p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
for dist in ("triton", "numpy", "pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout",
             "matplotlib"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "MISSING")
print("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"), "PYTHONPATH",
      os.environ.get("PYTHONPATH"))
import empf_triton, empf_triton.kernels
print("empf_triton", empf_triton.__file__, "kernels", empf_triton.kernels.__path__)
EOF
}

log "run_gpu.sh on $DEVICE, commit $EMPF_COMMIT, results in $RESULTS"
export -f env_info
export PY
stage env 60 bash -c env_info
cp "$RESULTS/env.log" "$RESULTS/env.txt" 2>/dev/null

# --- tests on the GPU: the whole suite, kernels compiled (the `device` fixture is "cuda").
# One pinned config per kernel (EMPF_AUTOTUNE=0) keeps compile time down; the benchmarks below
# autotune and check every Triton case against the eager reference before timing it.
# Left out: the sm_90 cross-compile test (this machine compiles for real) and the wheel build
# (needs the network for build isolation); both run in CPU CI.
read -r -a TEST_PATHS <<<"${EMPF_GPU_TESTS:-tests}"
TEST_ARGS=("${TEST_PATHS[@]}" -q -ra -p no:cacheprovider --junitxml="$RESULTS/tests.xml"
    --ignore=tests/test_gpu_compile.py
    --deselect tests/test_packaging.py::test_wheel_contains_kernels_and_every_subpackage)
has_module xdist && TEST_ARGS+=(-n 8)
has_module pytest_timeout && TEST_ARGS+=(--timeout=120)
stage tests 150 env EMPF_AUTOTUNE=0 "$PY" -m pytest "${TEST_ARGS[@]}"

# --- benchmarks: real kernels, autotuned, outputs not poisoned. One pytest call (and JSON) per
# op, most important first, so a timeout loses one file and the budget squeezes the least useful.
export EMPF_AUTOTUNE=${EMPF_AUTOTUNE_BENCH:-1} EMPF_POISON_EMPTY=0
export EMPF_BENCH_TARGET_S=${EMPF_BENCH_TARGET_S:-0.1}
BENCH_ARGS=(-q -p no:cacheprovider -p no:xdist)
if ! has_module pytest_benchmark; then
    log "pytest-benchmark missing: using bench/conftest.py's fallback runner (same JSON shape)"
    export EMPF_BENCH_FALLBACK=1
fi
has_module pytest_timeout && BENCH_ARGS+=(--timeout=240)
NB=bench/test_bench_neuron.py

# bench NAME LIMIT_S PYTEST_ARGS...: one benchmark stage writing RESULTS/bench_NAME.json
bench() {
    local name=$1 limit=$2
    shift 2
    stage "bench_$name" "$limit" "$PY" -m pytest "$@" "${BENCH_ARGS[@]}" \
        --benchmark-json="$RESULTS/bench_$name.json"
}

bench empf 120 "$NB::test_bench_copy_bandwidth" "$NB::test_bench_empf_neuron" -k "not compile"
bench step 60 "$NB::test_bench_empf_neuron_step" -k "not compile"
bench lif 70 "$NB::test_bench_lif_neuron" -k "not compile"
bench parallel 45 "$NB::test_bench_parallel_neuron" -k "not compile"
bench spikes 40 bench/test_bench_spikes.py
[ -f bench/test_bench_binary_gemm.py ] && bench binary_gemm 60 bench/test_bench_binary_gemm.py
# torch.compile(reference) at the two summary T only (inductor compiles each shape for seconds),
# fp32 float spikes; the fused multi-step op first.
export EMPF_BENCH_COMPILE_T=${EMPF_BENCH_COMPILE_T:-4,32}
bench compile_empf 100 "$NB::test_bench_empf_neuron" -k "compile and fp32-float"
bench compile_other 80 "$NB::test_bench_empf_neuron_step" "$NB::test_bench_lif_neuron" \
    "$NB::test_bench_parallel_neuron" -k "compile"

# --- report from whatever JSON exists.
JSONS=()
for f in "$RESULTS"/bench_*.json; do [ -s "$f" ] && JSONS+=("$f"); done
if [ "${#JSONS[@]}" -gt 0 ]; then
    stage report 60 "$PY" bench/report.py "${JSONS[@]}" --out "$RESULTS"
    [ -f "$RESULTS/summary.md" ] && sed -n '/^## Targets/,/^## Neuron/p' "$RESULTS/summary.md" | tee -a "$LOG"
else
    log "== report: no benchmark JSON was written"
    FAILED=1
fi

log "total $((SECONDS - T_START))s; stages:"
column -t -s $'\t' "$RESULTS/stages.tsv" 2>/dev/null | tee -a "$LOG" || cat "$RESULTS/stages.tsv"
if [ -n "${EMPF_RESULTS_TAR:-}" ]; then
    tar -czf "$EMPF_RESULTS_TAR" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" &&
        log "packed into $EMPF_RESULTS_TAR"
fi
exit "$FAILED"
