#!/usr/bin/env bash
# GPU acceptance of the weight path in one command (tests/gpu/), on a machine with the `gpu` extra installed
# (the Docker image, or `pip install -e ".[gpu,dev]"`). The transport follows the GPU count:
#   1 GPU  -> weight_sync.transport=ipc  (learner and generator share the GPU: one placement bundle,
#             fractional Ray GPUs, memory split 0.45 / 0.45)
#   2+ GPUs -> weight_sync.transport=nccl (learner and generator on GPUs of their own)
# (GPU_CHECK_TRANSPORT=ipc forces ipc on a multi-GPU machine.) Each: a short async run through the CLI, then
# greedy output after a sync == HF greedy, token for token. Stops after GPU_CHECK_TIMEOUT_S (480 s = 8 min).
# Writes transport, GPU count, sync time and tokens/s as JSON to ${GPU_CHECK_OUT:-runs/gpu_check.json}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
# GPU_CHECK_GPUS overrides the count torch sees: tests/test_gpu_check_script.py checks the choice on CPU.
GPUS=${GPU_CHECK_GPUS:-$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")}
if [ "$GPUS" -eq 0 ]; then
  echo "gpu_check: no CUDA GPU visible to torch; run it on a GPU machine with the gpu extra installed" >&2
  exit 2
fi
if [ "$GPUS" -ge 2 ]; then default=nccl; else default=ipc; fi
export GPU_CHECK_TRANSPORT=${GPU_CHECK_TRANSPORT:-$default}
export GPU_CHECK_OUT=${GPU_CHECK_OUT:-runs/gpu_check.json}
mkdir -p "$(dirname "$GPU_CHECK_OUT")"
rm -f "$GPU_CHECK_OUT"
echo "gpu_check: $GPUS GPU(s): weight_sync.transport=$GPU_CHECK_TRANSPORT"
start=$(date +%s)
status=0
timeout "${GPU_CHECK_TIMEOUT_S:-480}" "$PY" -m pytest tests/gpu -x -rs -p no:cacheprovider "$@" || status=$?
# The numbers the tests measured, plus what the script knows (even when a test failed or timed out).
"$PY" - "$GPU_CHECK_OUT" "$GPU_CHECK_TRANSPORT" "$GPUS" "$(( $(date +%s) - start ))" "$status" <<'EOF'
import json, sys
from pathlib import Path
out, transport, gpus, wall_s, status = sys.argv[1:]
data = json.loads(Path(out).read_text()) if Path(out).is_file() else {}
data.update(transport=transport, gpus=int(gpus), check_wall_s=int(wall_s), pytest_exit=int(status))
Path(out).write_text(json.dumps(data, indent=2))
print(json.dumps(data, indent=2))
EOF
echo "measurements: $GPU_CHECK_OUT"
exit "$status"
