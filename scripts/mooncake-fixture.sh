#!/usr/bin/env bash
# A conformance fixture (workload.jsonl + config.json) from a Mooncake JSON Lines trace, made
# with the oracle's mooncake_to_workload.py: arrivals compressed 10x, requests that can never
# fit the pool dropped, each request's max_tokens divided by D (rounded up) to keep step logs
# small. tests/conformance/regenerate.sh makes the mooncake-* fixtures with it and
# scripts/oracle-speed-suite.sh its speed workloads.
#
#   scripts/mooncake-fixture.sh TRACE DIR NUM_GPU_BLOCKS MAX_MODEL_LEN D [LIMIT [CONFIG_KEYS]]
#
# LIMIT: the first LIMIT trace lines (default 500). CONFIG_KEYS: JSON keys put in config.json
# after max_model_len (default '"enable_prefix_caching": true'). The oracle is found in
# ${GPUMEM_SHARED:-../shared}/conformance/vllm-oracle, relative to the repository root.
set -euo pipefail

if [[ $# -lt 5 || $# -gt 7 ]]; then
    echo "usage: $0 TRACE DIR NUM_GPU_BLOCKS MAX_MODEL_LEN D [LIMIT [CONFIG_KEYS]]" >&2
    exit 2
fi
TRACE="$1" DIR="$2" BLOCKS="$3" MAX_LEN="$4" D="$5" LIMIT="${6:-500}"
KEYS="${7:-\"enable_prefix_caching\": true}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${GPUMEM_SHARED:-../shared}"
[[ "$SHARED" = /* ]] || SHARED="$ROOT/$SHARED"
CONVERT="$SHARED/conformance/vllm-oracle/mooncake_to_workload.py"
[[ -e "$CONVERT" ]] || { echo "$0: $CONVERT not found (set GPUMEM_SHARED)" >&2; exit 2; }

mkdir -p "$DIR"
python3 "$CONVERT" "$TRACE" --limit "$LIMIT" --time-scale 0.1 --max-seq-tokens "$MAX_LEN" \
    -o "$DIR/workload.full.jsonl"
python3 - "$DIR/workload.full.jsonl" "$DIR/workload.jsonl" "$D" <<'PYEOF'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as g:
    for line in f:
        r = json.loads(line)
        r["max_tokens"] = -(-r["max_tokens"] // int(sys.argv[3]))
        g.write(json.dumps(r, separators=(",", ":")) + "\n")
PYEOF
rm "$DIR/workload.full.jsonl"
cat >"$DIR/config.json" <<CFG
{"num_gpu_blocks": $BLOCKS, "block_size": 16, "max_num_seqs": 64, "max_num_batched_tokens": 8192,
 "max_model_len": $MAX_LEN, $KEYS, "step_us": 20000}
CFG
