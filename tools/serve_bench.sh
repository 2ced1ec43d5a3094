#!/usr/bin/env bash
# The serving benchmark of the closing note, end to end: export the shipped pixart-digits model if it is not
# there yet (`deltadit-export` reuses an identical export), then load-test Triton and Ray Serve with 1 and 2
# instances/replicas, batching on and off, on 127.0.0.1, and print one table (+ JSON).
#   bash tools/serve_bench.sh                      # 200 requests, concurrency 16 per configuration
#   bash tools/serve_bench.sh --requests 8 --steps 2 --concurrency 4   # a quick smoke run
# Extra arguments go to `python -m runtime.serving bench` (see its --help). Run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINES=${DELTADIT_ENGINES:-engines/pixart-digits-16-fp32}
OUT=${DELTADIT_SERVE_BENCH_JSON:-bench-serve.json}
[ -f "$ENGINES/manifest.json" ] || .venv/bin/deltadit-export --out "$ENGINES"
.venv/bin/python -m runtime.serving bench "$ENGINES" --json "$OUT" "$@"
echo "JSON: $OUT" >&2
