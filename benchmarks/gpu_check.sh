#!/usr/bin/env bash
# The first thing to run on a GPU machine (README, "On a GPU"): versions, flex and grouped GEMM against their
# references in bf16, rope dtypes under autocast, a short gpu_suite and moe_layer run, and with 2+ GPUs FSDP2 against
# the native engine at ep = world (NCCL; issue 18, W1), the compiled decoding step against the eager one; one JSON.
# Needs torch only;
# about 3-5 minutes on one H100/H200.
#   bash benchmarks/gpu_check.sh [OUT.json]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
[ -x .venv/bin/python ] && PY=.venv/bin/python
timeout 420 "$PY" benchmarks/gpu_check.py --device cuda --out "${1:-gpu_check.json}"
