#!/usr/bin/env bash
# The whole CUDA proof in one step, on a machine with an NVIDIA GPU and driver:
#   scripts/cuda-check.sh
# Builds, runs `gpumem selftest --execute cuda` (every executor path simulated and on the GPU,
# one table), then the hardware test tiers, which fail rather than skip when no GPU opens.
# A pass: the selftest's last line says "N of N paths passed", and both test runs end with
# "test result: ok". Each step has a time limit so a hung driver cannot hang the check.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true
cargo build --release
timeout 300 target/release/gpumem selftest --execute cuda
GPUMEM_CUDA=1 timeout 600 cargo test --release -p gpumem-gpu --test cuda_device
GPUMEM_CUDA=1 timeout 600 cargo test --release --test cuda_cli
