#!/usr/bin/env python3
"""Runs the shared vLLM 0.33.0 oracle with a chosen prefix-caching hash algorithm.

    record_oracle.py ALGO --workload W --config C --out LOG --events-out EV

ALGO is one of vLLM's `prefix_caching_hash_algo` names (sha256, sha256_cbor). The oracle
itself always uses vLLM's default (sha256); this wrapper only sets its HASH_ALGO before
running it. Contains no vLLM code.
"""
import os
import sys

oracle_dir = os.environ.get("GPUMEM_ORACLE_DIR")
if not oracle_dir:
    here = os.path.dirname(os.path.abspath(__file__))
    shared = os.environ.get("GPUMEM_SHARED", os.path.join(here, "..", "..", "..", "shared"))
    oracle_dir = os.path.join(shared, "conformance", "vllm-oracle")
sys.path.insert(0, oracle_dir)

import oracle  # noqa: E402

oracle.HASH_ALGO = sys.argv[1]
sys.exit(oracle.main(sys.argv[2:]))
