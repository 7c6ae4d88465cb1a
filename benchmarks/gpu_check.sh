#!/usr/bin/env bash
# GPU check of issue 15, for a lent GPU machine (<= 8 minutes, no downloads). In the repo root:
#
#   bash benchmarks/gpu_check.sh
#
# Random-weight models of realistic shapes are built in code (a ~1.1B Llama as pi_ref, three ~100M
# value models and a 3-head one): plain HF generate vs MAVIS M=3 tokens/s at batch 1, 8 and 32 in
# bf16, peak GPU memory, value-training steps with and without gradient checkpointing; then the
# placement tests (bf16 decode/train/serve vs fp32) on the GPU. Results: benchmarks/results/gpu/*.json
# (or $OUT/gpu when OUT is set, as on the device tool).
#
# The machine's torch may be older than this project's pin; wheels this project needs there
# (a newer transformers, ...) travel in .whl/ (see /work/.library/device/README.md) and are
# installed to /tmp/site first when present.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out="${OUT:+$OUT/gpu}"
out="${out:-benchmarks/results/gpu}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 480 python3 benchmarks/gpu_check.py --out "$out" --budget 360
# the half-precision tests on the GPU (auto placement = cuda + bf16); short, after the numbers are safe
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_placement.py -k "bf16 or reaches" 2>&1 | tail -5 | tee "$out/placement_tests.txt" || true
