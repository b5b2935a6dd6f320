#!/usr/bin/env bash
# Kernel tests compiled for the GPU, then the kernel benchmark. Run from the repository root on a CUDA machine
# (results under $OUT, or benchmarks/results when OUT is unset).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
export PYTHONPATH=. GEARKIT_TEST_DEVICE=cuda TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$OUT/kernels_gpu_tests.log" | tail -25
python3 benchmarks/kernel_bench.py --out "$OUT/kernels_gpu.csv" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/kernels_gpu.log" | tail -5
# End to end (issue 14): Llama-3-8B shapes with random weights, 4 of 32 layers (per-layer figures scale by 8),
# 32k context, batch sweep under an 80 GiB budget for the caches GEAR's figure compares.
timeout 300 python3 benchmarks/throughput.py --device cuda --model llama3-8b-shaped --layers 4 --context 32768 \
    --new-tokens 8 --batches 1,4,16,32,64 --budget-gib 80 --caches DynamicCache,sink-3,kivi-2,gear-2 \
    --out "$OUT/throughput_gpu.csv" 2>&1 | tee "$OUT/throughput_gpu.log" | tail -25
