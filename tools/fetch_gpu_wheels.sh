#!/usr/bin/env bash
# Populate .whl/ with the pure-Python wheels tools/gpu_check.sh installs on the lent GPU machine.
#
# That machine (see the device notes) has CUDA PyTorch, onnx, onnxruntime (CPU), huggingface_hub,
# safetensors, click, numpy, Pillow, requests, regex, filelock and zipp, but no diffusers and no
# importlib_metadata, and it cannot reach a package registry. Run this here (it needs PyPI), once:
#
#   bash tools/fetch_gpu_wheels.sh
#
# .whl/ is git-ignored; the device call carries it (carry: [".whl"]). Versions are the ones the CPU
# tests run with here (diffusers 0.42.1 needs huggingface_hub >= 1.32; the GPU image has 1.33).
# TensorRT and onnxruntime-gpu are not carried: their wheels are far over the 64 MiB a call may carry,
# so the check reports those parts as not run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
WHEELS=(diffusers==0.42.1 importlib_metadata==10.2.0 zipp==4.1.2)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d .whl "${WHEELS[@]}"
ls -la .whl
du -sh .whl
