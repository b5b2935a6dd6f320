#!/usr/bin/env bash
# Kernel tests compiled for the GPU, then the kernel benchmark. Run from the repository root on a CUDA machine
# (results under $OUT, or benchmarks/results when OUT is unset).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
export PYTHONPATH=. GEARKIT_TEST_DEVICE=cuda TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/kernels_gpu_tests.log" | tail -25
python3 benchmarks/kernels.py --out "$OUT/kernels_gpu.csv" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/kernels_gpu.log" | tail -5
