#!/usr/bin/env bash
# The full Beauty pipeline on one GPU, in-process: Stage I and II to convergence (both in bf16),
# then the evaluation, with jobs/configs/beauty/gpu.yaml. Target: at most 10 minutes on an
# H100-class GPU.
#
# Needs there: python3 (3.12, the device machine's: the carried faiss wheel is fetched for CPython 3.12)
# with torch (CUDA), pyarrow, pyyaml, safetensors and numpy. Not Ray, not the
# encoder's weights (the data and embed stages are linked from the prepared seed run), not faiss
# (its wheel is carried and installed into CARRY/site when missing). Prepare CARRY here first:
#
#   python benchmarks/gpu_full_run.py prepare .carry/gpu --run runs/beauty_full_run --data ../shared/data/amazon-beauty
#
# then, on the GPU machine, from the repository root:
#
#   benchmarks/gpu_full_run.sh .carry/gpu "$OUT" --run-dir /tmp/gpu_run
#
# It writes OUT/gpu_full_run.json (metrics, stage times, device) and the run's manifest.json,
# metrics.json and predictions.parquet. `--tiny` runs the tiny synthetic config instead (the CPU
# check in tests/test_gpu_full_run.py). Details: benchmarks/gpu_full_run.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_full_run.py run "$@"
