#!/usr/bin/env bash
# Issue 5's GPU checks as one command for a lent device machine, whose python3 holds torch, timm and pytest
# (oialr runs from src/, nothing to install). From the device tool, in the repository root:
#     run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
# About 5 minutes on an H200. Writes $OUT/gpu_step_time.md (the step-time harness, one section per workload, the
# card named in each heading) and $OUT/gpu_check.log (versions, the CUDA tests, the harness's progress).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"                  # the device machine's python3 holds torch
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
{
    nvidia-smi -L
    "$PY" -c "import sys, torch, timm; print(sys.version.split()[0], 'torch', torch.__version__, 'timm', \
timm.__version__, torch.cuda.get_device_name())"
    # the library on CUDA trains as on the CPU (tests/test_cuda.py; skipped on machines without a GPU)
    timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
    for model in vit block512 block1024; do
        echo "step_time: $model"
        timeout 150 "$PY" benchmarks/step_time.py --model "$model" --device cuda --repeats 7 --steps 10 \
            --warmup 5 >> "$OUT/gpu_step_time.md"
    done
} 2>&1 | tee "$OUT/gpu_check.log"
