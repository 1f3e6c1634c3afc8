#!/usr/bin/env bash
# Times gpumem's vllm-0.33 personality against vLLM 0.33's own scheduler (the oracle) on the
# same conformance workload, checks that both step logs are identical, and prints the ratio.
#
#   scripts/oracle-speed.sh tests/conformance/mooncake-500-large [REPEATS]
#
# Needs the oracle set up once: ../shared/conformance/vllm-oracle/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
case="${1:?usage: scripts/oracle-speed.sh FIXTURE_DIR [REPEATS]}"
repeats="${2:-5}"
shared="${GPUMEM_SHARED:-../shared}"
oracle_py="${GPUMEM_ORACLE_HOME:-$HOME/.cache/gpumem-vllm-oracle}/venv/bin/python"
[ -x "$oracle_py" ] || { echo "error: oracle not set up: run $shared/conformance/vllm-oracle/setup.sh" >&2; exit 1; }

cargo build --release -q
cfg="$case/config.json"
knob() { python3 -c "import json,sys; print(json.load(open('$cfg'))['$1'])"; }
args=(kv --trace "$case/workload.jsonl" --format conformance --engine vllm-0.33
      --cost "fixed:$(knob step_us)" --kv-blocks "$(knob num_gpu_blocks)"
      --block-size "$(knob block_size)" --max-num-seqs "$(knob max_num_seqs)"
      --max-num-batched-tokens "$(knob max_num_batched_tokens)" --max-model-len "$(knob max_model_len)")
[ "$(knob enable_prefix_caching)" = "True" ] || args+=(--no-prefix-caching)

out="$(mktemp -d)"
now() { date +%s.%N; }
t0=$(now)
"$oracle_py" "$shared/conformance/vllm-oracle/oracle.py" --workload "$case/workload.jsonl" \
    --config "$cfg" --out "$out/oracle.jsonl" 2>/dev/null
t1=$(now)
best=""
for _ in $(seq "$repeats"); do
  s=$(now)
  target/release/gpumem "${args[@]}" --step-log "$out/gpumem.jsonl" > /dev/null
  e=$(now)
  best=$(python3 -c "t = $e - $s; b = '$best'; print(min(t, float(b)) if b else t)")
done
cmp -s "$out/oracle.jsonl" "$out/gpumem.jsonl" || { echo "error: step logs differ ($out)" >&2; exit 1; }
oracle=$(python3 -c "print($t1 - $t0)")
printf 'step logs identical (%s lines)\n' "$(wc -l < "$out/oracle.jsonl")"
printf 'oracle (vLLM 0.33 scheduler, one run)   %8.3f s\n' "$oracle"
printf 'gpumem kv (best of %s, whole process)    %8.3f s\n' "$repeats" "$best"
printf 'ratio                                    %8.0fx\n' "$(python3 -c "print($oracle / $best)")"
rm -rf "$out"
