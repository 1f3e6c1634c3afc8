#!/usr/bin/env bash
# The many-models table of the README: every policy on 3, 5 and 8 models, one and two H100s,
# the built-in workload. Usage: scripts/models-claims.sh [REQUESTS] (default 2000).
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-2000}"
bin=target/release/gpumem
cargo build --release --quiet
three=llama-3.1-8b,qwen2.5-7b,mistral-7b
five=$three,llama-3.1-8b@ft1,qwen2.5-7b@ft2
eight=$five,mistral-7b@ft3,llama-3.1-8b@ft4,qwen2.5-7b@ft5
row=$(cat <<'PY'
import json, sys
r = json.load(sys.stdin)
ms = lambda us: f"{us / 1000:.0f} ms"
t = r["ttft_us"]
print(f"| {sys.argv[1]} | {sys.argv[2]} | {r['policy']} | {r['peak_gpu_bytes'] / 2**30:.1f} | "
      f"{r['throughput_tokens_per_s']:.0f} | {ms(t['p50'])} | {ms(t['p99'])} | {r['weight_loads']} |")
PY
)
echo "| models | GPUs | policy | peak GiB | tokens/s | TTFT p50 | TTFT p99 | weight loads |"
echo "|---|---:|---|---:|---:|---:|---:|---:|"
for set in three five eight; do
  for gpus in 1 2; do
    for policy in static lru offloader sleep; do
      json=$($bin models --models "${!set}" --gpus "$gpus" --policy "$policy" \
        --requests "$requests" --json 2>/dev/null) || { echo "| $set | $gpus | $policy | refused: does not fit | | | | |"; continue; }
      echo "$json" | python3 -c "$row" "$set" "$gpus"
    done
  done
done
