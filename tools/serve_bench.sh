#!/usr/bin/env bash
# The serving benchmark of the closing note, end to end: export the shipped pixart-digits model (`deltadit-export`
# reuses an identical export), then load-test Triton and Ray Serve with 1 and 2
# instances/replicas, batching on and off, on 127.0.0.1, and print one table (+ JSON).
#   bash tools/serve_bench.sh                      # 200 requests, concurrency 16 per configuration
#   bash tools/serve_bench.sh --requests 8 --steps 2 --concurrency 4   # a quick smoke run
# Extra arguments go to `python -m runtime.serving bench` (see its --help). Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DELTADIT_SERVE_BENCH_JSON:-bench-serve.json}
if [ -n "${DELTADIT_ENGINES:-}" ]; then
  ENGINES=$DELTADIT_ENGINES  # an export of your own: used as it is, never re-exported
else
  ENGINES=engines/pixart-digits-16-fp32
  # Always through the exporter: an identical export is reused in seconds, and one made by an older deltadit
  # (which today's runtime may refuse, e.g. companion files without a recorded sha256) is rebuilt in place.
  .venv/bin/deltadit-export --out "$ENGINES"
fi
.venv/bin/python -m runtime.serving bench "$ENGINES" --json "$OUT" "$@"
echo "JSON: $OUT" >&2
