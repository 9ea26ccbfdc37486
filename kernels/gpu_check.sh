#!/usr/bin/env bash
# On a CUDA machine: the kernel tests compiled (no interpreter, fp32 and bf16, plus model-size
# shapes, the static sm_80 / sm_90 resource check), then the kernel benchmark (ours vs
# FlexAttention vs SDPA with the bias vs naive, forward and backward, stages 1-4 at 96^3 and
# 128^3, the prior attention, the peak memory of a train step). Output goes to the terminal and
# to $OUT (or runs/gpu_check): test_kernels.txt, bench_static.md, bench_kernels.md.
#   bash kernels/gpu_check.sh [--quick]   (--quick fits one 10-minute run: batches 1 and 4, 96^3 train step)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt" || true
unset TRITON_INTERPRET
KERNELS_ON_GPU=1 timeout 200 $PY -m pytest -q tests/test_kernels.py -x --durations=5 2>&1 | tee "$OUT/test_kernels.txt"
timeout 60 $PY bench.py kernels --static 2>&1 | tee "$OUT/bench_static.md"
timeout 380 $PY bench.py kernels "$@" 2>&1 | tee "$OUT/bench_kernels.md"
