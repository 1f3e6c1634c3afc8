#!/usr/bin/env python3
"""The Mooncake conversation trace repeated N times back to back: gpumem's scale workload.

    scripts/mooncake-repeat.py 100 > big100.jsonl            # 1,203,100 requests
    scripts/mooncake-repeat.py 10 TRACE.jsonl -o big10.jsonl

Copy k (0-based) is the trace with every `timestamp` shifted by k * (span + 1000) ms, span =
last timestamp - first timestamp, so copies follow each other with one idle second between
them, and every hash id raised by k * (largest hash id + 1), so copies share no prefix. Lines
keep the trace's own keys and order (other keys pass through unchanged). TRACE defaults to
${GPUMEM_SHARED_TRACES:-../shared/traces}/mooncake/conversation_trace.jsonl, relative to the
repository root. Only the standard library is used; the output is the same on every run.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_trace():
    shared = os.environ.get("GPUMEM_SHARED_TRACES", os.path.join(ROOT, "..", "shared", "traces"))
    return os.path.join(shared, "mooncake", "conversation_trace.jsonl")


def read_records(path):
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                ts, ids = r["timestamp"], r["hash_ids"]
                if not isinstance(ts, int) or not all(isinstance(h, int) for h in ids):
                    raise ValueError("timestamp and hash_ids must be integers")
            except (ValueError, KeyError, TypeError) as e:
                sys.exit(f"{path}:{lineno}: {e}")
            records.append(r)
    if not records:
        sys.exit(f"{path}: no records")
    return records


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("copies", type=int, help="how many copies (>= 1)")
    p.add_argument("trace", nargs="?", default=default_trace(), help="Mooncake JSONL trace")
    p.add_argument("-o", "--output", help="output file (default: standard output)")
    a = p.parse_args()
    if a.copies < 1:
        p.error("copies must be >= 1")
    records = read_records(a.trace)
    times = [r["timestamp"] for r in records]
    shift_ms = max(times) - min(times) + 1000
    id_stride = max(max(r["hash_ids"], default=0) for r in records) + 1
    out = open(a.output, "w", encoding="utf-8") if a.output else sys.stdout
    with out:
        for k in range(a.copies):
            for r in records:
                copy = dict(r)
                copy["timestamp"] = r["timestamp"] + k * shift_ms
                copy["hash_ids"] = [h + k * id_stride for h in r["hash_ids"]]
                out.write(json.dumps(copy) + "\n")


if __name__ == "__main__":
    main()
