#!/usr/bin/env bash
# One-GPU check (torch, transformers, triton only; no network, ray, vllm or verl): the loss tests on CUDA, the
# naive vs fused EKSFT head at V=151,936, and the peak memory of a truncated Qwen3-8B-shaped SFT step at the
# recipe's token budget against the dry run's estimate. About 3 minutes on one H200 (docs/benchmarks.md has its numbers); prints one summary.
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   bash scripts/gpu_check.sh --cpu --tiny    # CPU smoke run at toy sizes (tests/test_gpu_check.py runs it)
#   bash scripts/gpu_check.sh --verl          # also verl's SFT trainer: scripts/bench_sft_step.py's steady-state ratio
#                                             # (needs verl: ../shared/gpu-kit/ on a bare GPU machine); --verl-only
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" scripts/gpu_check.py "$@"
