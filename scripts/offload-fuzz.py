#!/usr/bin/env python3
"""Differential fuzzing of the CPU offload tier against vLLM 0.33.0's own code (not in CI).

Makes random small conformance workloads with a CPU tier (seeded: case i of seed s is the same
on every run), runs each through the oracle (../shared/conformance/vllm-oracle, vLLM's
Scheduler + OffloadingConnector) and through gpumem (the conformance_run example), and
compares the step logs byte for byte and the exit codes.

    cargo build --release -p gpumem-sim --example conformance_run
    scripts/offload-fuzz.py --cases 300 --seed 1            # from the repository root
    scripts/offload-fuzz.py --cases 50 --keep /tmp/fuzz      # keep every case's files

Small pools, GPU and CPU, so that both evict; shared prompt prefixes so that both hit; latency
K of 0 to 3 steps; LRU and ARC; offload_block_size 1 to 3 GPU blocks; prompt-only or all
tokens; prefix caching mostly on. A differing case is kept under --keep (default
/tmp/gpumem-offload-fuzz) with both logs. Exit status 1 if any case differs.
"""

import argparse
import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("GPUMEM_SHARED", os.path.join(ROOT, "..", "shared"))
ORACLE = os.path.join(SHARED, "conformance", "vllm-oracle", "oracle.py")
PY = os.path.join(os.environ.get("GPUMEM_ORACLE_HOME",
                                  os.path.expanduser("~/.cache/gpumem-vllm-oracle")),
                  "venv", "bin", "python")
GPUMEM = os.path.join(ROOT, "target", "release", "examples", "conformance_run")


def make_case(rng):
    bs = rng.choice([2, 4, 4, 8])
    bpc = rng.choice([1, 1, 2, 3])
    num_gpu_blocks = rng.randint(8, 40)
    max_model_len = rng.randint(bs * 3, (num_gpu_blocks - 1) * bs)
    max_num_seqs = rng.randint(1, 6)
    cfg = {
        "num_gpu_blocks": num_gpu_blocks,
        "block_size": bs,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": rng.randint(max(max_num_seqs, bs * 2), 96),
        "max_model_len": max_model_len,
        "enable_prefix_caching": rng.random() < 0.85,
        "step_us": 1000,
        "offload_cpu_blocks": rng.randint(1, 30),
    }
    if bpc != 1 or rng.random() < 0.3:
        cfg["offload_block_size"] = bs * bpc
    if rng.random() < 0.5:
        cfg["offload_policy"] = rng.choice(["lru", "arc"])
    if rng.random() < 0.7:
        cfg["offload_latency_steps"] = rng.randint(0, 3)
    if rng.random() < 0.4:
        cfg["offload_prompt_only"] = rng.random() < 0.5
    # Shared prefixes: a few "system prompts", each request one of them plus its own tail.
    prefixes = [[rng.randint(1, 50_000) for _ in range(rng.randint(0, 4 * bs * bpc))]
                for _ in range(rng.randint(1, 4))]
    reqs = []
    t = 0
    for i in range(rng.randint(2, 14)):
        t += rng.choice([0, 0, 1000, 2000, 5000, 20_000])
        p = list(rng.choice(prefixes))
        p += [rng.randint(1, 50_000) for _ in range(rng.randint(0, 3 * bs))]
        if rng.random() < 0.3 and reqs:  # a repeat of an earlier prompt
            p = list(rng.choice(reqs)["prompt"])
        p = p[: max_model_len - 1] or [rng.randint(1, 50_000)]
        reqs.append({"id": f"r{i}", "arrival_us": t, "prompt": p,
                     "max_tokens": rng.randint(1, 12)})
    return cfg, reqs


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, p.stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default="/tmp/gpumem-offload-fuzz")
    ap.add_argument("--keep-all", action="store_true")
    args = ap.parse_args()
    for f in (ORACLE, PY, GPUMEM):
        if not os.path.exists(f):
            sys.exit(f"{f} not found (oracle setup.sh; cargo build --release -p gpumem-sim "
                     "--example conformance_run)")
    os.makedirs(args.keep, exist_ok=True)
    agree = differ = refused = stalled = 0
    lines = 0
    for i in range(args.cases):
        rng = random.Random(args.seed * 1_000_003 + i)
        cfg, reqs = make_case(rng)
        d = os.path.join(args.keep, f"case-{args.seed}-{i}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        with open(os.path.join(d, "workload.jsonl"), "w") as f:
            for r in reqs:
                f.write(json.dumps(r) + "\n")
        w, c = os.path.join(d, "workload.jsonl"), os.path.join(d, "config.json")
        oracle_log, gpumem_log = os.path.join(d, "oracle.jsonl"), os.path.join(d, "gpumem.jsonl")
        rc_o, err_o = run([PY, ORACLE, "--workload", w, "--config", c, "--out", oracle_log,
                           "--max-steps", "100000"])
        rc_g, err_g = run([GPUMEM, w, c, gpumem_log])
        same = rc_o == rc_g
        if same and rc_o in (0, 3):
            a = open(oracle_log).read() if os.path.exists(oracle_log) else ""
            b = open(gpumem_log).read() if os.path.exists(gpumem_log) else ""
            same = a == b
            lines += a.count("\n")
        if same:
            agree += 1
            refused += rc_o == 2
            stalled += rc_o == 3
            if not args.keep_all:
                for name in os.listdir(d):
                    os.remove(os.path.join(d, name))
                os.rmdir(d)
        else:
            differ += 1
            print(f"DIFFER case {i}: oracle exit {rc_o}, gpumem exit {rc_g}: {d}")
            if rc_o not in (0, 3):
                print("  oracle:", err_o.strip().splitlines()[-1:] )
            if rc_g not in (0, 3):
                print("  gpumem:", err_g.strip().splitlines()[-1:])
    print(f"{args.cases} cases (seed {args.seed}): {agree} agree ({refused} refused by both, "
          f"{stalled} stalled in both, {lines} step-log lines compared), {differ} differ")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
