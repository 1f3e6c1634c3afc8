#!/usr/bin/env bash
# Issue 11's short-run target, summed over several workloads: gpumem's vllm-0.33 engine against
# the oracle (vLLM 0.33.0's own scheduler, ../shared/conformance/vllm-oracle) on short
# conformance runs cut from the Mooncake conversation trace, as whole processes.
#
#   scripts/oracle-speed-suite.sh            # from the repository root
#   REPS=9 scripts/oracle-speed-suite.sh     # gpumem: best of 9 per workload (default 5)
#
# Each workload is a slice of the trace (its first arrival moved to 0), made into a fixture by
# scripts/mooncake-fixture.sh as tests/conformance/regenerate.sh makes mooncake-500-large and
# mooncake-500-small (arrivals compressed 10x, requests that can never fit the pool dropped,
# max_tokens divided by D). The two configs are those fixtures': a roomy pool
# (20,000 blocks) and a tight one (1,200 blocks: preemptions). scripts/oracle-speed.sh runs
# each (and checks that both step logs are identical); this script prints a row per workload
# and the ratio of the summed times. The fixtures live in a temporary folder, removed after.
#
# Exit status: 0 every step log identical, 1 one differs or a run failed, 2 bad setup.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED="${GPUMEM_SHARED:-../shared}"
[[ "$SHARED" = /* ]] || SHARED="$ROOT/$SHARED"
TRACE="$SHARED/traces/mooncake/conversation_trace.jsonl"
for f in "$SHARED/conformance/vllm-oracle/mooncake_to_workload.py" "$TRACE"; do
    [[ -e "$f" ]] || { echo "$0: $f not found (set GPUMEM_SHARED)" >&2; exit 2; }
done

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# name first-line requests num_gpu_blocks max_model_len D
WORKLOADS=(
    "head-500-roomy 0 500 20000 131072 8"
    "head-500-tight 0 500 1200 19184 16"
    "at-3000-roomy 3000 400 20000 131072 8"
    "at-3000-tight 3000 400 1200 19184 16"
    "at-7000-roomy 7000 400 20000 131072 8"
    "at-7000-tight 7000 400 1200 19184 16"
)

make_fixture() { # dir first count blocks max_model_len D
    local d="$1"
    mkdir -p "$d"
    python3 - "$TRACE" "$2" "$3" "$d/slice.jsonl" <<'PYEOF'
import json, sys
trace, first, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rows = []
with open(trace) as f:
    for i, line in enumerate(f):
        if i >= first + count:
            break
        if i >= first and line.strip():
            rows.append(json.loads(line))
t0 = rows[0]["timestamp"]
with open(out, "w") as g:
    for r in rows:
        r["timestamp"] -= t0
        g.write(json.dumps(r) + "\n")
PYEOF
    "$ROOT/scripts/mooncake-fixture.sh" "$d/slice.jsonl" "$d" "$4" "$5" "$6" "$3" \
        2>"$d/convert.log" || {
        cat "$d/convert.log" >&2
        return 1
    }
}

echo "load before: $(uptime)"
printf '| workload | requests | steps | oracle s | gpumem s | ratio |\n|---|---:|---:|---:|---:|---:|\n' \
    >"$TMP/table.md"
status=0
for w in "${WORKLOADS[@]}"; do
    read -r name first count blocks max_len d <<<"$w"
    echo "$name: trace lines $first..$((first + count)), $blocks blocks..." >&2
    make_fixture "$TMP/$name" "$first" "$count" "$blocks" "$max_len" "$d"
    if ! "$ROOT/scripts/oracle-speed.sh" "$TMP/$name" >"$TMP/$name.out" 2>"$TMP/$name.err"; then
        echo "$name: failed or step logs differ:" >&2
        cat "$TMP/$name.out" "$TMP/$name.err" >&2
        status=1
        continue
    fi
    python3 - "$TMP/$name.out" "$name" "$(wc -l <"$TMP/$name/workload.jsonl")" \
        >>"$TMP/table.md" <<'PYEOF'
import re, sys
text = open(sys.argv[1]).read()
steps = re.search(r"identical \((\d+) steps\)", text).group(1)
oracle = float(re.search(r"oracle wall: ([0-9.]+) s", text).group(1))
gpumem = float(re.search(r"gpumem wall: ([0-9.]+) s", text).group(1))
print(f"| {sys.argv[2]} | {sys.argv[3]} | {steps} | {oracle:.3f} | {gpumem:.4f} | {oracle / gpumem:.0f}x |")
PYEOF
done
echo "load after:  $(uptime)"
cat "$TMP/table.md"
python3 - "$TMP/table.md" <<'PYEOF'
import sys
rows = [l.split("|") for l in open(sys.argv[1]) if l.startswith("| ") and not l.startswith("| workload")]
oracle = sum(float(r[4]) for r in rows)
gpumem = sum(float(r[5]) for r in rows)
if rows:
    print(f"summed over {len(rows)} workloads: oracle {oracle:.2f} s, gpumem {gpumem:.3f} s: {oracle / gpumem:.0f}x")
PYEOF
exit $status
