#!/usr/bin/env bash
# One GPU session, at most 8 minutes: every check and benchmark this project needs from a lent GPU,
# most important evidence first, each step under its own `timeout`, output flushed as it goes to at
# most 8 files in one folder. Run from the repository root on the GPU machine:
#
#   bash bench/gpu_session.sh                 # OUT=bench/results/gpu-<date>/ unless OUT is set
#   bash bench/gpu_session.sh --small         # the same steps on CPU at tiny shapes (interpreter): a check
#                                             # of the script itself (tests/test_gpu_session.py runs it)
#
# Steps (budget in seconds: 20 + 135 + 100 + 95 + 115 = 465, under 480):
#   1. fused encode at the Pythia-70M and Gemma-2-2B shapes: compile (autotune), correctness against the
#      float32 reference (max |dr|, bitwise determinism), time, TFLOP/s against a bf16 matmul measured in
#      the same process, n_regs / n_spills of every compiled variant             -> kernels.csv, kernels.log
#   2. end-to-end sweep at the Pythia-70M shape (200k tokens, INT8..INT4): engine vs engine-serial, the
#      naive pipeline on one batch (8,192 tokens)                                 -> e2e.csv, e2e-pythia.log
#   3. the CUDA-only tests (kernel tests with pinned block sizes, runner, statistics) -> pytest-gpu.log
#   4. end-to-end sweep at the Gemma-2-2B shape on 131,072 tokens (per-token rates extrapolate)
#                                                                                   -> e2e.csv, e2e-gemma.log
# plus device.txt (device, versions) and summary.txt (each step's exit status and seconds): 8 files.
# A step that fails or times out is recorded and the next one runs; the exit status is 1 if any failed.
# The GPU image has no sae_lens and no network; nothing here needs either.
set -uo pipefail

SMALL=0
for arg in "$@"; do
  case "$arg" in
    --small) SMALL=1 ;;
    *) echo "unknown argument '$arg': bash bench/gpu_session.sh [--small]" >&2; exit 2 ;;
  esac
done

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRITON_CACHE_AUTOTUNING=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
T_START=$SECONDS

# step NAME BUDGET_S LOG -- command...: run under `timeout`, tee to LOG, record status and time.
step() {
  local name=$1 budget=$2 log=$3
  shift 4
  local t0=$SECONDS
  echo "== $name (budget ${budget}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT"; elif [ "$rc" -ne 0 ]; then status="FAILED rc=$rc"; fi
  [ "$status" = ok ] || FAILED=1
  printf '%-10s %-12s %4ds  %s\n' "$name" "$status" $((SECONDS - t0)) "$log" | tee -a "$SUMMARY"
}

if [ "$SMALL" -eq 1 ]; then
  export TRITON_INTERPRET=1
  KERNELS=(--cpu --small --interpret --models pythia,gemma --ops encode --precisions auto,tf32x3 --tokens 256)
  PYTHIA=(--shape pythia-70m --tokens 1024 --naive-tokens 1024 --bits 8 --device cpu --batch-size 2 --naive-batch-size 2)
  GEMMA=(--shape gemma-2-tiny --tokens 1024 --skip-naive --bits 8..7 --device cpu)
  TESTS=(tests/kernel_tests/test_encode_moments.py -k "determinism or split or pinned")
  B1=300 B2=300 B3=200 B4=200  # a shared CPU is slow; only the GPU run must fit 8 minutes
else
  export TRITON_INTERPRET=0
  KERNELS=(--models pythia,gemma --ops encode --precisions auto,tf32x3 --tokens 16384 --no-topk)
  PYTHIA=(--shape pythia-70m --tokens 200000 --naive-tokens 8192 --bits 8..4)
  GEMMA=(--shape gemma-2-2b --tokens 131072 --skip-naive --bits 8..4)
  TESTS=(tests/engine/test_runner.py tests/engine/test_runner_oom.py tests/engine/test_statistics.py
         tests/kernel_tests/test_encode_moments.py tests/kernel_tests/test_prune.py tests/kernel_tests/test_fake_quant.py)
  B1=135 B2=100 B3=95 B4=115
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  fi
  timeout 20 "$PY" -c "import torch, transformers; import triton
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} 2>&1 | tee "$OUT/device.txt"

step kernels "$B1" "$OUT/kernels.log" -- "$PY" bench/kernels.py "${KERNELS[@]}" --csv "$OUT/kernels.csv"
step pythia "$B2" "$OUT/e2e-pythia.log" -- "$PY" bench/e2e.py "${PYTHIA[@]}" --csv "$OUT/e2e.csv"
step tests "$B3" "$OUT/pytest-gpu.log" -- "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step gemma "$B4" "$OUT/e2e-gemma.log" -- "$PY" bench/e2e.py "${GEMMA[@]}" --csv "$OUT/e2e.csv"

echo "total      $((SECONDS - T_START))s  (results in $OUT)" | tee -a "$SUMMARY"
exit $FAILED
