#!/usr/bin/env bash
# Prepared GPU check for egma-kernels: build, GPU tests, GPU sweep, other tests -- logs and results in $OUT.
#
# Run from the repository root on a fresh GPU machine that has its own torch/triton (no internet needed):
#     OUT=/path/to/results bash benchmarks/gpu_check.sh
# Total wall time stays under 8 minutes: each step runs under `timeout` with its own limit, and no step
# starts with less than 15 s left of the TOTAL_S budget (default 460 s). The sweep gets whatever the build
# and the GPU tests left (less OTHER_TESTS_S), and its own --budget stops it in time to write its results.
#
# Order: environment -> self-check of the triton backend (egma-bench --selfcheck: the verdict in the first
# minute, before anything is built; report in $OUT/selfcheck_triton.json) -> build (pip install
# --no-build-isolation --no-deps -e .) -> import check -> self-check of the cuda backend
# ($OUT/selfcheck_cuda.json) ->
# the fused backends' test files on the GPU (test_compiled_cuda.py, test_triton_backend.py: their
# device-generic tests run on CUDA tensors there) -> the other files' GPU-marked tests -> Triton tile
# tuning (only with TUNE_S > 0; otherwise run benchmarks/tune_triton.py as a second call) -> egma-bench
# GPU sweep -> the other tests (they also run in CPU CI, so they come last).
# Each step's exit code goes to $OUT/steps.tsv; the script itself exits 0 unless a self-check, the build or
# the GPU tests failed, so that partial results always come back.
#
# Knobs (environment): OUT, TOTAL_S, SELFCHECK_S, BUILD_S, GPU_TESTS_S, GPU_OTHER_S, TUNE_S (0 skips it), SWEEP_MAX_S, OTHER_TESTS_S, BENCH_ARGS (replaces
# the sweep's arguments), OTHER_TESTS_ARGS, SKIP_BUILD=1, PYTHON (default python3). A dry run on a machine without a GPU:
#     SKIP_BUILD=1 BENCH_ARGS="--smoke --no-compile" OTHER_TESTS_ARGS="tests/test_bench.py" OUT=/tmp/g bash benchmarks/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-460}"
SELFCHECK_S="${SELFCHECK_S:-150}"  # each self-check: about a minute, most of it compiling the Triton kernels
BUILD_S="${BUILD_S:-150}"
GPU_TESTS_S="${GPU_TESTS_S:-240}"  # Triton compiles each kernel variant the tests use (cold cache; saved-route and recompute variants)
SWEEP_MAX_S="${SWEEP_MAX_S:-300}"   # the sweep gets what is left, less OTHER_TESTS_S, up to this
OTHER_TESTS_S="${OTHER_TESTS_S:-50}"
GPU_OTHER_S="${GPU_OTHER_S:-40}"
TUNE_S="${TUNE_S:-0}"   # 0: run benchmarks/tune_triton.py as a second call (see benchmarks/README.md)
START=$(date +%s)
STEPS="$OUT/steps.tsv"
: > "$STEPS"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME LIMIT LOGFILE CMD...: run CMD under timeout (at most what is left of TOTAL_S), log, record rc.
step() {
  local name="$1" limit="$2" log="$3"; shift 3
  local left=$(( TOTAL_S - $(elapsed) ))
  if (( left < 15 )); then
    echo "=== $name: skipped, ${left}s left of ${TOTAL_S}s ==="
    printf '%s\tskipped\t0\n' "$name" >> "$STEPS"
    return 99
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s, t=$(elapsed)s) ==="
  local t0=$(date +%s)
  timeout -k 10 "$limit" "$@" > >(tee "$OUT/$log") 2>&1
  local rc=$?
  echo "=== $name: rc=$rc in $(( $(date +%s) - t0 ))s (t=$(elapsed)s) ==="
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
  return $rc
}

# --- environment -------------------------------------------------------------------------------------
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi failed"
  "$PYTHON" - <<'PY' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
try:
    import numpy; print("numpy", numpy.__version__)
except Exception as e:
    print("numpy: not importable:", e)
PY
  command -v nvcc && nvcc --version | tail -2
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The build needs the real toolkit root (docs/building.md) and an explicit arch list; H100/H200 are sm_90.
if [[ -z "${CUDA_HOME:-}" ]]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")")"; do
    if [[ -x "$c/bin/nvcc" ]]; then export CUDA_HOME="$c"; break; fi
  done
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
unset TRITON_INTERPRET
echo "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# --- self-check, first: is the triton backend (backend=None's choice on a GPU) right on this card? ----
# It needs nothing built: the package is imported from this checkout (the extension missing is intended
# here, hence EGMA_KERNELS_SKIP_EXTENSION). The verdicts are cached under $OUT/selfcheck-cache.
export EGMA_KERNELS_CACHE="$OUT/selfcheck-cache"
SELFCHECK_RC=0
step selfcheck-triton "$SELFCHECK_S" selfcheck_triton.log env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
  EGMA_KERNELS_SKIP_EXTENSION=1 "$PYTHON" -m egma_kernels.bench.cli --selfcheck --providers triton \
  --report "$OUT/selfcheck_triton.json" || { rc=$?; (( rc == 2 )) || SELFCHECK_RC=$rc; }

# --- build -------------------------------------------------------------------------------------------
BUILD_RC=0
if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  step build "$BUILD_S" build.log "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e . || BUILD_RC=$?
else
  echo "=== build: skipped (SKIP_BUILD=1) ==="
fi
# Whether or not the install worked, the tests and the sweep import the package from this checkout.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step import 60 import.log "$PYTHON" -c "
import torch, egma_kernels as ek
print('egma_kernels', ek.__version__, 'from', ek.__file__)
print('known', ek.known_backends())
print('available on cuda', ek.available_backends('cuda'), 'on cpu', ek.available_backends('cpu'))
"
# The cuda backend's self-check, once the extension is built (rc 2, not counted, when it is not; likewise
# the triton one above without a GPU).
step selfcheck-cuda "$SELFCHECK_S" selfcheck_cuda.log "$PYTHON" -m egma_kernels.bench.cli --selfcheck \
  --providers cuda --report "$OUT/selfcheck_cuda.json" || { rc=$?; (( rc == 2 )) || SELFCHECK_RC=$rc; }

# --- GPU tests ---------------------------------------------------------------------------------------
GPU_RC=0
# The fused backends' whole test files (their device-generic tests run on the GPU here: float64 and
# float32 against the reference with poisoned outputs), then the GPU-marked tests of the other files.
step gpu-tests "$GPU_TESTS_S" pytest_gpu.log "$PYTHON" -m pytest -q -rs --junitxml="$OUT/pytest_gpu.xml" \
  tests/test_compiled_cuda.py tests/test_triton_backend.py || GPU_RC=$?
step gpu-tests-other "$GPU_OTHER_S" pytest_gpu_other.log "$PYTHON" -m pytest -q -m gpu -rs \
  --junitxml="$OUT/pytest_gpu_other.xml" tests --ignore=tests/test_triton_backend.py \
  --ignore=tests/test_compiled_cuda.py || { rc=$?; (( rc == 5 )) || GPU_RC=$rc; }

# --- Triton tile tuning (one setting at a time; results in tune/) -------------------------------------
if (( TUNE_S > 0 )); then
  step tune "$TUNE_S" tune.log "$PYTHON" benchmarks/tune_triton.py --out "$OUT/tune" --budget $(( TUNE_S - 25 ))
fi

# --- the GPU sweep -----------------------------------------------------------------------------------
# The sweep's own budget stops new measurements in time to write the table (what is left is recorded
# as skipped); the timeout is the backstop.
SWEEP_S=$(( TOTAL_S - $(elapsed) - OTHER_TESTS_S - 5 ))
(( SWEEP_S > SWEEP_MAX_S )) && SWEEP_S=$SWEEP_MAX_S
BENCH_BUDGET=$(( SWEEP_S - 35 ))   # start-up, the table and the charts fit in the rest
(( BENCH_BUDGET < 10 )) && BENCH_BUDGET=10
read -r -a BENCH <<< "${BENCH_ARGS:---sweep gpu --budget $BENCH_BUDGET}"
PLOT=()
if "$PYTHON" -c "import matplotlib" 2>/dev/null; then PLOT=(--plot); else echo "(matplotlib missing: no charts)"; fi
step sweep "$SWEEP_S" bench_stdout.log "$PYTHON" -m egma_kernels.bench.cli "${BENCH[@]}" --out "$OUT/bench" "${PLOT[@]}"
if [[ ! -s "$OUT/bench/results.md" && -s "$OUT/bench/results.jsonl" ]]; then
  echo "(the sweep did not finish: rendering the table from the JSON lines it wrote)"
  timeout 60 "$PYTHON" -m egma_kernels.bench.cli --render "$OUT/bench/results.jsonl" > "$OUT/bench/results.md" || true
fi
if [[ -f "$OUT/bench/results.md" ]]; then
  CARD=$("$PYTHON" -c "import json;r=[json.loads(l) for l in open('$OUT/bench/results.jsonl')];import re;print(re.sub(r'[^A-Za-z0-9._-]+','-',r[0]['device_name']).strip('-') if r else 'unknown')" 2>/dev/null || echo unknown)
  echo "results for benchmarks/results/: $OUT/bench (device $CARD, $(date -u +%Y-%m-%d))"
  echo "${CARD}_$(date -u +%Y-%m-%d)" > "$OUT/bench/RESULTS_NAME"
fi

# --- the other tests ---------------------------------------------------------------------------------
read -r -a OTHER <<< "${OTHER_TESTS_ARGS:-tests --ignore=tests/test_triton_backend.py --ignore=tests/test_compiled_cuda.py}"
step other-tests "$OTHER_TESTS_S" pytest_other.log "$PYTHON" -m pytest -q -x -m "not gpu and not slow" \
  --junitxml="$OUT/pytest_other.xml" "${OTHER[@]}"

echo "=== steps (name, rc, seconds) ==="
cat "$STEPS"
echo "total $(elapsed)s"
if (( BUILD_RC != 0 || SELFCHECK_RC != 0 )) || (( GPU_RC != 0 && GPU_RC != 5 )); then exit 1; fi
exit 0
