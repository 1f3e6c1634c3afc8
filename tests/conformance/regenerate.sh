#!/usr/bin/env bash
# Regenerate the conformance fixtures: workload.jsonl + config.json per case,
# and steps.jsonl from vLLM 0.33.0's own scheduler (the oracle in
# ../shared/conformance/vllm-oracle; run its setup.sh once first).
# A case whose inputs the oracle refuses (exit 2) gets expected_error.txt (the
# oracle's stderr) instead of steps.jsonl.
#
#   tests/conformance/regenerate.sh            # from the repository root
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SHARED="${GPUMEM_SHARED:-$HERE/../../../shared}"
ORACLE="$SHARED/conformance/vllm-oracle"
PY="${GPUMEM_ORACLE_HOME:-$HOME/.cache/gpumem-vllm-oracle}/venv/bin/python"
TRACE="$SHARED/traces/mooncake/conversation_trace.jsonl"

# 1. explicit-prompt cases
python3 "$HERE/gen_cases.py" "$HERE" >/dev/null

# 2. Mooncake: the first 500 requests of the conversation trace, arrivals
#    compressed 10x. The logs of the full output lengths are 2-3 MB, so
#    max_tokens is divided by D (rounded up) to keep each fixture under 1 MB.
#    The small pool (1200 blocks of 16 = 19184 tokens) forces preemptions;
#    requests that can never fit it are dropped by --max-seq-tokens.
mooncake() { # name num_gpu_blocks max_model_len D [limit] [extra config keys]
    "$HERE/../../scripts/mooncake-fixture.sh" "$TRACE" "$HERE/$1" "$2" "$3" "$4" "${5:-500}" \
        "${6:-\"enable_prefix_caching\": true}"
}
mooncake mooncake-500-large 20000 131072 8
mooncake mooncake-500-small 1200 19184 16
# A CPU tier of 400 blocks of 64 tokens under the small pool, prefix caching off: the tier is
# the only cache (first 300 requests).
mooncake offload-mooncake-300 1200 19184 16 300 '"enable_prefix_caching": false,
 "offload_cpu_blocks": 400, "offload_block_size": 64, "offload_policy": "lru",
 "offload_latency_steps": 2'

# 3. step logs
for d in "$HERE"/*/; do
    name="$(basename "$d")"
    rm -f "$d/steps.jsonl" "$d/expected_error.txt"
    set +e
    "$PY" "$ORACLE/oracle.py" --workload "$d/workload.jsonl" --config "$d/config.json" \
        --out "$d/steps.jsonl" 2>"$d/oracle.stderr"
    rc=$?
    set -e
    if [[ $rc -eq 2 ]]; then
        grep 'error' "$d/oracle.stderr" >"$d/expected_error.txt"
        rm -f "$d/steps.jsonl"
    elif [[ $rc -ne 0 ]]; then
        echo "$name: oracle exit $rc" >&2; cat "$d/oracle.stderr" >&2; exit 1
    fi
    echo "$name: $(tail -n1 "$d/oracle.stderr")"
    rm "$d/oracle.stderr"
done

# Priority scheduling (priority-*): the same workloads as pressure-0..2 and random-3 with a
# seeded `priority` per request and `"policy": "priority"` in config.json. The shared oracle
# runs FCFS only; these logs come from a scratch copy of it changed in three places, so that
# vLLM's own Scheduler runs with policy "priority" and each Request gets its priority:
#   cp ../shared/conformance/vllm-oracle/*.py /tmp/prio/
#   sed -i 's/        policy="fcfs",/        policy=cfg.get("policy", "fcfs"),/' /tmp/prio/oracle.py
#   sed -i 's/    return {k: cfg\[k\] for k in CONFIG_KEYS}/    out = {k: cfg[k] for k in CONFIG_KEYS}\n    out["policy"] = cfg.get("policy", "fcfs")\n    return out/' /tmp/prio/oracle.py
#   sed -i 's/                    "index": len(reqs)}/                    "index": len(reqs), "priority": r.get("priority", 0)}/' /tmp/prio/oracle.py
#   sed -i 's|            arrival_time=spec\["arrival_us"\] / 1e6, block_hasher=self.block_hasher)|            arrival_time=spec["arrival_us"] / 1e6, block_hasher=self.block_hasher,\n            priority=spec.get("priority", 0))|' /tmp/prio/oracle.py
#   $PY /tmp/prio/oracle.py --workload priority-X/workload.jsonl --config priority-X/config.json --out priority-X/steps.jsonl
# (priorities: Python random.Random(sum of the base name's character codes).choice([-1, 0, 0, 1, 2]) per line)
