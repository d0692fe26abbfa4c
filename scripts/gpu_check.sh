#!/usr/bin/env bash
# GPU acceptance of issue 9 in one command, on a machine with >= 2 CUDA GPUs and the `gpu` extra
# installed (the Docker image, or `pip install -e ".[gpu,dev]"`): a short async run with a vLLM CUDA
# generator and the NCCL transport, then greedy output after an NCCL sync == HF greedy.
# Writes the measured sync time and tokens/s to ${GPU_CHECK_OUT:-runs/gpu_check.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export GPU_CHECK_OUT=${GPU_CHECK_OUT:-runs/gpu_check.json}
rm -f "$GPU_CHECK_OUT"
"$PY" -m pytest tests/gpu -x -rs -p no:cacheprovider "$@"
echo "measurements: $GPU_CHECK_OUT"
cat "$GPU_CHECK_OUT"
