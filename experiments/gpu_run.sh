#!/usr/bin/env bash
# One command for a bare GPU machine (python3 with torch, torchvision, onnx, onnxscript, onnxruntime,
# safetensors, numpy, pytest, tqdm, matplotlib; no network, tailwise not installed): runs from this source
# tree. See experiments/gpu_run.py for the steps and the output, docs/GPU.md for the call.
#   experiments/gpu_run.sh --check      # here, before a lease: the carry fits; prints the device tool's call
#   experiments/gpu_run.sh --data data/fashion-mnist --out "$OUT" [--state gpu-state] [--minutes 8]
#   experiments/gpu_run.sh --dry-run --data FIXTURE --out /tmp/out --imbalance-factor 10    # CPU, tiny
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 BENTOML_DO_NOT_TRACK=true
PY="${PYTHON:-python3}"
exec "$PY" "$REPO/experiments/gpu_run.py" --python "$PY" "$@"
