#!/usr/bin/env bash
# The seed paper's pipeline in miniature (docs/smollm2_gold_proxy.md): prepare SmolLM2, sample pairs labelled
# by the gold scorer, train the proxy reward model on them, run async online DPO against it. Each step is
# timed into OUT/times.txt. Usage: scripts/smollm2_gold_proxy.sh [OUT] (default runs/gp)
set -euo pipefail
OUT=${1:-runs/gp}
CLI=${ASYNC_RLHF:-async-rlhf}
mkdir -p "$OUT"
step() {  # step NAME COMMAND...: run it, append its wall time
  local name=$1 start=$SECONDS; shift
  echo "== $name: $*"
  "$@"
  echo "$name $((SECONDS - start))s" | tee -a "$OUT/times.txt"
}
step prepare $CLI prepare smollm2  # about 3 min the first time, then a cache hit
step sample-pairs $CLI sample-pairs configs/smollm2_gold_proxy.yaml reward.learned=null \
  --out "$OUT/pairs.jsonl" --prompts 160 --samples 2
step train-rm $CLI train-rm "$OUT/pairs.jsonl" --base smollm2 --out "$OUT/rm" --epochs 2 --lr 2e-5 --batch-size 8 --max-length 160
step train $CLI train configs/smollm2_gold_proxy.yaml "reward.learned.path=$OUT/rm" --run-dir "$OUT/rlhf"
$CLI plot "$OUT/rlhf" --out "$OUT/plot.png"
