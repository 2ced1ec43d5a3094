#!/usr/bin/env bash
# GPU check of issue 6 (torch / TensorRT / ONNX Runtime CUDA backends): one run, under 8 minutes on an H100.
#
# What it does: installs the carried pure-Python wheels (.whl/), exports full-width PixArt-α 512 with
# random weights in fp16 ON THIS MACHINE (torch.export programs are not moved across torch versions),
# checks each available backend against PyTorch eager (fp16 tolerances in tools/gpu_check.py), and
# prints a latency table per image and per step: eager vs runtime `none` vs `delta-dit`, with and
# without CUDA graphs. JSON and the log go to $OUT (gpu_check.json, gpu_check.log). TensorRT and ONNX
# Runtime CUDA parts run only when those libraries import; the table says when they did not.
#
# Prepare once, here (needs PyPI):   bash tools/fetch_gpu_wheels.sh      # fills the git-ignored .whl/
# Run on the lent GPU machine (device tool), from the repository root:
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Options after the script name go to tools/gpu_check.py (e.g. --quick for an 8-block model,
# --repeats 3, --no-tensorrt). Locally on a CPU, as a smoke test of this script:
#   PYTHON=.venv/bin/python bash tools/gpu_check.sh --device cpu --quick --resolution 128 --steps 4 --repeats 1
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
SITE=${DELTADIT_GPU_SITE:-/tmp/deltadit-site}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no .whl/ here (bash tools/fetch_gpu_wheels.sh fills it); using the installed packages" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt" || true
# 540 s: the device call allows 600; what was measured before a timeout is already in gpu_check.json.
set +e
timeout --signal=INT --kill-after=20 "${GPU_CHECK_TIMEOUT:-540}" "$PY" tools/gpu_check.py --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 124 ] && echo "gpu_check.py timed out; partial results in $OUT/gpu_check.json" >&2
exit "$rc"
