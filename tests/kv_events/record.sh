#!/usr/bin/env bash
# Records the KV-event fixtures of this folder with vLLM 0.33.0's own scheduler and block
# pool (the oracle in ../shared/conformance/vllm-oracle; run its setup.sh once first):
#   default.msgpack      vLLM's default hash (sha256 over pickle), NONE_HASH from "vllm-none-hash"
#   sha256_cbor.msgpack  prefix_caching_hash_algo = sha256_cbor
# Each is the concatenation of the msgpack payloads vLLM's ZMQ publisher sends
# ([ts, [events...], dp_rank], events as maps with a "type" key; hashes the digest's last
# 8 bytes as u64), with ts = simulated step time. steps.jsonl is the oracle's step log (its
# stored/removed counts are what the importer tests check), summary.txt its summary.
#
#   tests/kv_events/record.sh            # from the repository root
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${GPUMEM_ORACLE_HOME:-$HOME/.cache/gpumem-vllm-oracle}/venv/bin/python"
unset PYTHONHASHSEED  # NONE_HASH must come from vLLM's fixed seed
for algo in sha256 sha256_cbor; do
    name=$algo; [ "$algo" = sha256 ] && name=default
    "$PY" "$HERE/record_oracle.py" "$algo" --workload "$HERE/workload.jsonl" \
        --config "$HERE/config.json" --out "$HERE/steps.$name.jsonl" \
        --events-out "$HERE/$name.msgpack" 2>"$HERE/summary.$name.txt"
done
# The hash algorithm never changes a scheduling decision: one step log for both.
cmp "$HERE/steps.default.jsonl" "$HERE/steps.sha256_cbor.jsonl"
mv "$HERE/steps.default.jsonl" "$HERE/steps.jsonl"
rm "$HERE/steps.sha256_cbor.jsonl"
sed -E 's/wall [0-9.]+ s, [0-9]+ steps\/s/wall (elided)/' "$HERE/summary.default.txt" >"$HERE/summary.txt"
rm "$HERE/summary.default.txt" "$HERE/summary.sha256_cbor.txt"
ls -l "$HERE"/*.msgpack
