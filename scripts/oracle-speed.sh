#!/usr/bin/env bash
# The issue's speed target: gpumem's vllm-0.33 engine against the oracle (vLLM 0.33.0's own
# Scheduler + KVCacheManager, ../shared/conformance/vllm-oracle) on the same conformance
# workload, in one run. Both must write the identical step log (checked with cmp); the script
# prints both wall times and the ratio.
#
#   scripts/oracle-speed.sh tests/conformance/mooncake-500-large     # from the repository root
#   REPS=9 scripts/oracle-speed.sh DIR                               # gpumem: best of 9 (default 5)
#
# DIR holds workload.jsonl and config.json (the oracle's config, see the oracle's README).
# Times are whole processes, start-up included: the oracle once (it takes seconds), gpumem the
# best of REPS runs (tens of milliseconds). The oracle's own in-process figure (its summary on
# stderr, without Python start-up and vLLM imports) is printed too. Needs the oracle set up
# (its setup.sh): ${GPUMEM_ORACLE_HOME:-~/.cache/gpumem-vllm-oracle}/venv. The oracle is found
# in ${GPUMEM_SHARED:-../shared}/conformance/vllm-oracle, relative to the repository root.
#
# Exit status: 0 the logs are identical, 1 they differ or a run failed, 2 bad usage.
set -euo pipefail

if [[ $# -ne 1 || ! -f "$1/workload.jsonl" || ! -f "$1/config.json" ]]; then
    echo "usage: $0 FIXTURE_DIR   (a folder with workload.jsonl and config.json)" >&2
    exit 2
fi
FIX="$(cd "$1" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${GPUMEM_SHARED:-../shared}"
[[ "$SHARED" = /* ]] || SHARED="$ROOT/$SHARED"
ORACLE="$SHARED/conformance/vllm-oracle/oracle.py"
PY="${GPUMEM_ORACLE_HOME:-$HOME/.cache/gpumem-vllm-oracle}/venv/bin/python"
REPS="${REPS:-5}"
for f in "$ORACLE" "$PY"; do
    [[ -e "$f" ]] || { echo "$0: $f not found (set GPUMEM_SHARED / GPUMEM_ORACLE_HOME, run the oracle's setup.sh)" >&2; exit 2; }
done

if grep -q '"policy": *"priority"' "$FIX/config.json"; then
    echo "$0: $FIX uses the priority policy; the shared oracle runs FCFS only" >&2
    exit 2
fi

# The gpumem command line from the oracle's config.
mapfile -t CFG < <("$PY" - "$FIX/config.json" <<'PYEOF'
import json, sys
c = json.load(open(sys.argv[1]))
print(f"fixed:{c['step_us']}")
for k in ("num_gpu_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
    print(c[k])
print("" if c.get("enable_prefix_caching", True) else "--no-prefix-caching")
PYEOF
)
ARGS=(kv --trace "$FIX/workload.jsonl" --format conformance --engine vllm-0.33
      --cost "${CFG[0]}" --kv-blocks "${CFG[1]}" --block-size "${CFG[2]}"
      --max-num-seqs "${CFG[3]}" --max-num-batched-tokens "${CFG[4]}"
      --max-model-len "${CFG[5]}")
[[ -n "${CFG[6]}" ]] && ARGS+=("${CFG[6]}")

echo "building gpumem (release)..." >&2
(cd "$ROOT" && cargo build --release --quiet -p gpumem --bin gpumem)
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ "$TARGET" = /* ]] || TARGET="$ROOT/$TARGET"
GPUMEM="$TARGET/release/gpumem"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
now() { date +%s%N; }

echo "load before: $(uptime)"
echo "fixture:     $FIX ($(wc -l <"$FIX/workload.jsonl") requests)"

# The oracle, once.
unset PYTHONHASHSEED
t0=$(now)
"$PY" "$ORACLE" --workload "$FIX/workload.jsonl" --config "$FIX/config.json" \
    --out "$TMP/oracle.jsonl" 2>"$TMP/oracle.stderr" || {
    echo "oracle failed:" >&2; cat "$TMP/oracle.stderr" >&2; exit 1; }
oracle_ns=$(( $(now) - t0 ))

# gpumem, best of REPS.
best_ns=""
for ((i = 0; i < REPS; i++)); do
    rm -f "$TMP/gpumem.jsonl"
    t0=$(now)
    "$GPUMEM" "${ARGS[@]}" --step-log "$TMP/gpumem.jsonl" >/dev/null 2>"$TMP/gpumem.stderr" || {
        echo "gpumem failed:" >&2; cat "$TMP/gpumem.stderr" >&2; exit 1; }
    ns=$(( $(now) - t0 ))
    [[ -z "$best_ns" || $ns -lt $best_ns ]] && best_ns=$ns
done
echo "load after:  $(uptime)"

if cmp -s "$TMP/oracle.jsonl" "$TMP/gpumem.jsonl"; then
    same="identical ($(wc -l <"$TMP/oracle.jsonl") steps)"
else
    same="DIFFERENT"
fi
echo "oracle:      $(tail -n1 "$TMP/oracle.stderr")"
echo "command:     $GPUMEM ${ARGS[*]} --step-log OUT"
echo "step logs:   $same"
awk -v o="$oracle_ns" -v g="$best_ns" -v r="$REPS" 'BEGIN {
    printf "oracle wall: %.3f s (one run, whole process)\n", o / 1e9
    printf "gpumem wall: %.4f s (best of %d, whole process)\n", g / 1e9, r
    printf "ratio:       %.0fx\n", o / g
}'
[[ "$same" != DIFFERENT ]]
