#!/usr/bin/env bash
# Set up .venv on a fresh machine: the pinned CPU torch first (an open range would pull a multi-GB
# CUDA build), then deltadit with its dev extras, the OpenVINO backend and the serving extra (so their tests
# run in CI). Safe to rerun: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${DELTADIT_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[dev,openvino,serve]"
# The tritonserver binary bundled by nvidia-pytriton, for the serving tests and `serve triton`; --no-deps because
# its metadata pins numpy<2 (see pyproject.toml, extra "serve").
python -m pip install -q --no-deps "nvidia-pytriton==${DELTADIT_PYTRITON_VERSION:-0.7.0}"
python - <<'PY'
import torch, diffusers, onnxruntime
print(f"deltadit setup ok: torch {torch.__version__}, diffusers {diffusers.__version__}, onnxruntime {onnxruntime.__version__}")
PY
