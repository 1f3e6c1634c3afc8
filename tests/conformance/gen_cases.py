#!/usr/bin/env python3
"""Write the explicit-prompt conformance cases (workload.jsonl + config.json)
under tests/conformance/<case>/. Deterministic: no clock, seeded RNG only.
The step logs are produced by regenerate.sh with vLLM's oracle.

    python3 gen_cases.py OUT_DIR
"""
import json
import os
import random
import sys

BASE = dict(num_gpu_blocks=64, block_size=4, max_num_seqs=8,
            max_num_batched_tokens=64, max_model_len=60,
            enable_prefix_caching=True, step_us=1000)
GEN = 2_000_000_000


def req(i, t, prompt, mt):
    return {"id": f"r{i}", "arrival_us": t, "prompt": list(prompt), "max_tokens": mt}


def gen_tok(line, k):
    return GEN + line * 10_000 + k


def cases():
    out = {}

    # Prompts of exactly k blocks: the last prompt token is never a hit, so a
    # block-aligned prompt hits one block fewer; decode blocks are cached too
    # (r6 re-sends r0's prompt plus r0's first generated tokens).
    p8 = list(range(1, 9))
    w = [req(0, 0, p8, 3),
         req(1, 10_000, p8, 2),
         req(2, 20_000, range(1, 13), 2),
         req(3, 30_000, range(1, 13), 2),
         req(4, 40_000, range(1, 14), 2),
         req(5, 40_000, range(1, 5), 2),
         req(6, 50_000, p8 + [gen_tok(0, 0), gen_tok(0, 1), gen_tok(0, 2), 99], 6),
         req(7, 60_000, range(1, 4), 9)]
    out["exact-blocks"] = (w, dict(BASE))

    # Preemption followed by eviction of the victim's cached blocks: a small
    # pool, three requests growing by decode; victims are running[-1].
    w = [req(0, 0, range(100, 120), 14),
         req(1, 0, list(range(100, 116)) + [7, 8], 14),
         req(2, 0, range(200, 218), 12),
         req(3, 3000, range(300, 310), 6),
         req(4, 9000, range(200, 218), 4)]
    out["preempt-evict"] = (w, dict(BASE, num_gpu_blocks=14, max_model_len=48,
                                    max_num_batched_tokens=32))

    # Head-of-line blocking: r1 cannot pass the full-sequence gate while r0
    # runs; r2 (small, would fit) waits behind it.
    w = [req(0, 0, range(1000, 1040), 10),
         req(1, 1000, range(2000, 2050), 3),
         req(2, 1000, range(3000, 3004), 3),
         req(3, 2000, range(4000, 4006), 2)]
    out["hol-blocking"] = (w, dict(BASE, num_gpu_blocks=17, max_model_len=64))

    # max_num_seqs reached: only two run at once.
    w = [req(i, 0 if i < 5 else 4000, range(10 * i, 10 * i + 5 + i), 3 + i % 3)
         for i in range(7)]
    out["max-num-seqs"] = (w, dict(BASE, max_num_seqs=2, max_num_batched_tokens=16))

    # Prefix caching off: the same shared prefixes never hit; freed blocks
    # all go to the head of the free queue.
    shared = list(range(500, 512))
    w = [req(i, 2000 * (i // 2), shared + [600 + i] * (i + 1), 4) for i in range(6)]
    out["no-prefix-caching"] = (w, dict(BASE, enable_prefix_caching=False,
                                        num_gpu_blocks=16, max_num_batched_tokens=24))
    out["shared-prefix"] = (w, dict(BASE, num_gpu_blocks=16, max_num_batched_tokens=24))

    # Same-step hits on blocks cached by an earlier request in the same step,
    # chunked prefill under a small token budget, duplicate hashes.
    sys_prompt = list(range(7000, 7024))
    w = [req(0, 0, sys_prompt + [1, 2, 3], 5),
         req(1, 0, sys_prompt + [4, 5], 5),
         req(2, 0, sys_prompt[:10] + [9] * 9, 5),
         req(3, 1000, sys_prompt + [1, 2, 3, 4, 5, 6], 4),
         req(4, 1500, sys_prompt[:8], 2),
         req(5, 30000, sys_prompt + [1, 2, 3], 3)]
    out["same-step-hits"] = (w, dict(BASE, num_gpu_blocks=40, max_num_batched_tokens=20))

    # A request that stops at max_model_len before max_tokens.
    w = [req(0, 0, range(1, 11), 100), req(1, 0, range(1, 9), 100)]
    out["max-model-len-stop"] = (w, dict(BASE, max_model_len=16, num_gpu_blocks=9))

    # Idle gaps: the clock jumps to the step of the next arrival (arrivals
    # that are not multiples of step_us).
    w = [req(0, 0, range(1, 6), 2), req(1, 12_345, range(1, 9), 2),
         req(2, 12_346, range(1, 9), 1), req(3, 99_999, range(1, 3), 1)]
    out["idle-gaps"] = (w, dict(BASE, step_us=1000))

    # Seeded random workloads: a few shared prefixes, small pools.
    for seed, (blocks, seqs, budget, caching) in enumerate(
            [(24, 6, 32, True), (40, 8, 48, True), (20, 4, 16, True),
             (30, 8, 40, False), (60, 16, 64, True), (18, 8, 24, True)]):
        rng = random.Random(1000 + seed)
        prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(3, 20))]
                    for _ in range(4)]
        w = []
        t = 0
        for i in range(40):
            t += rng.choice([0, 0, 500, 1000, 3000, 7000])
            p = list(rng.choice(prefixes)) + [rng.randrange(1, 50)
                                              for _ in range(rng.randrange(0, 14))]
            if not p:
                p = [1]
            w.append(req(i, t, p[:40], rng.randrange(1, 20)))
        out[f"random-{seed}"] = (w, dict(BASE, num_gpu_blocks=blocks, max_num_seqs=seqs,
                                         max_num_batched_tokens=budget, max_model_len=56,
                                         enable_prefix_caching=caching))

    # Heavy pressure: tiny pools, long decodes, small token budgets (mid-prefill victims),
    # a larger block size, many repeats of the same prompts (duplicate hashes).
    for seed, (blocks, bs, seqs, budget, mml, plen, mt) in enumerate(
            [(12, 4, 8, 8, 44, 30, 30), (40, 16, 8, 24, 600, 120, 60),
             (16, 2, 6, 6, 30, 20, 25)]):
        rng = random.Random(2000 + seed)
        prefixes = [[rng.randrange(1, 9) for _ in range(rng.randrange(plen // 3, plen))]
                    for _ in range(3)]
        w = []
        t = 0
        for i in range(50):
            t += rng.choice([0, 0, 0, 250, 1000, 4000])
            p = list(rng.choice(prefixes)) + [rng.randrange(1, 9)
                                              for _ in range(rng.randrange(0, plen // 4))]
            w.append(req(i, t, p[:min(plen, mml - 1)], rng.randrange(1, mt)))
        out[f"pressure-{seed}"] = (w, dict(BASE, num_gpu_blocks=blocks, block_size=bs,
                                           max_num_seqs=seqs, max_num_batched_tokens=budget,
                                           max_model_len=mml))

    # The CPU offload tier (vLLM's OffloadingConnector): GPU pools small enough that cached
    # prefixes leave the GPU, CPU tiers small enough that they evict, and prompts that come
    # back later (CPU hits, loads). LRU and ARC, copy latency K, CPU blocks of 1-3 GPU blocks,
    # all tokens offloaded, prefix caching off (the CPU tier is then the only cache).
    # The smallest: A's chunks go to the CPU tier, B's push A out of the GPU pool, C re-sends A.
    a = list(range(1, 18))
    w = [{"id": "A", "arrival_us": 0, "prompt": a, "max_tokens": 3},
         {"id": "B", "arrival_us": 1000, "prompt": list(range(100, 118)), "max_tokens": 3},
         {"id": "C", "arrival_us": 20000, "prompt": a, "max_tokens": 2}]
    out["offload-tiny"] = (w, dict(BASE, num_gpu_blocks=12, max_num_seqs=4,
                                   max_num_batched_tokens=32, max_model_len=40,
                                   offload_cpu_blocks=6, offload_latency_steps=1))
    for name, (policy, k, bpc, caching, prompt_only, blocks, cpu) in {
            "offload-lru-k0": ("lru", 0, 1, True, True, 16, 12),
            "offload-lru-k2-x2": ("lru", 2, 2, True, True, 18, 8),
            "offload-arc-k0": ("arc", 0, 1, True, True, 16, 12),
            "offload-arc-k1-x2-all": ("arc", 1, 2, True, False, 16, 10),
            "offload-lru-k1-x3-nocache": ("lru", 1, 3, False, True, 30, 7),
            "offload-arc-k3-x2-nocache": ("arc", 3, 2, False, True, 30, 9),
    }.items():
        rng = random.Random(name)
        prefixes = [[rng.randrange(1, 60) for _ in range(rng.randrange(4, 28))]
                    for _ in range(5)]
        w = []
        t = 0
        for i in range(36):
            t += rng.choice([0, 0, 1000, 2000, 5000, 12000])
            if w and rng.random() < 0.3:
                p = list(rng.choice(w)["prompt"])
            else:
                p = list(rng.choice(prefixes)) + [rng.randrange(1, 60)
                                                  for _ in range(rng.randrange(0, 10))]
            w.append(req(i, t, p[:40] or [1], rng.randrange(1, 12)))
        cfg = dict(BASE, num_gpu_blocks=blocks, max_num_seqs=4, max_num_batched_tokens=24,
                   max_model_len=56, enable_prefix_caching=caching,
                   offload_cpu_blocks=cpu, offload_policy=policy,
                   offload_latency_steps=k)
        if bpc != 1:
            cfg["offload_block_size"] = 4 * bpc
        if not prompt_only:
            cfg["offload_prompt_only"] = False
        out[name] = (w, cfg)

    # Refused inputs (the oracle exits 2; the step log is empty).
    w = [req(0, 0, range(1, 9), 2)]
    out["error-pool-too-small"] = (w, dict(BASE, num_gpu_blocks=10, max_model_len=40))
    w = [req(0, 0, range(1, 9), 2), req(1, 10, range(1, 61), 2)]
    out["error-prompt-too-long"] = (w, dict(BASE))
    out["error-offload-block-size"] = (w[:1], dict(BASE, offload_cpu_blocks=8,
                                                   offload_block_size=6))
    return out


def main():
    root = sys.argv[1]
    for name, (w, cfg) in cases().items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "workload.jsonl"), "w") as f:
            for r in w:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
            f.write("\n")
        print(name)


if __name__ == "__main__":
    main()
