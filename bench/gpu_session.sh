#!/usr/bin/env bash
# Everything this project checks and times on a lent GPU, in stages that each fit one device call
# (10 minutes). Run from the repository root on the GPU machine; results land in $OUT (the device
# tool brings that folder back) or bench/results/gpu-<date>/ when OUT is unset. Copy the CSV rows into
# bench/results/{kernels,e2e}.csv afterwards; every row names the device.
#
#   bash bench/gpu_session.sh check     # device facts; kernel + runner tests on CUDA     (~3-5 min)
#   bash bench/gpu_session.sh kernels   # bench/kernels.py at the Pythia and Gemma shapes  (~3-5 min)
#   bash bench/gpu_session.sh pythia    # e2e: Pythia-70M shape, 200k tokens, INT8..INT4   (~2-4 min)
#   bash bench/gpu_session.sh gemma     # e2e: Gemma-2-2B shape, 500k tokens, INT8..INT4   (~6-9 min)
#
# The naive pipeline runs on the first 50-65k tokens only: its float64 host moments over [8192, F]
# matrices take seconds per batch, so all 200k / 500k tokens would not fit one call; its tokens/s is
# what is compared (bench/e2e.py --naive-tokens).
# The GPU image has no sae_lens (the engine, kernels and benchmarks do not need it) and no network.
set -uo pipefail
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
stage=${1:?usage: bash bench/gpu_session.sh check|kernels|pythia|gemma}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee -a "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"

case "$stage" in
  check)
    python3 -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_runner.py \
      tests/engine/test_statistics.py 2>&1 | tee "$OUT/pytest-gpu.log"
    ;;
  kernels)
    python3 bench/kernels.py --models pythia --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/kernels-pythia.log"
    python3 bench/kernels.py --models gemma --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/kernels-gemma.log"
    ;;
  pythia)
    python3 bench/e2e.py --shape pythia-70m --tokens 200000 --naive-tokens 51200 --bits 8..4 --csv "$OUT/e2e.csv" 2>&1 | tee "$OUT/e2e-pythia.log"
    ;;
  gemma)
    python3 bench/e2e.py --shape gemma-2-2b --tokens 500000 --naive-tokens 65536 --bits 8..4 --csv "$OUT/e2e.csv" 2>&1 | tee "$OUT/e2e-gemma.log"
    ;;
  *)
    echo "unknown stage '$stage': use check, kernels, pythia or gemma" >&2
    exit 2
    ;;
esac
