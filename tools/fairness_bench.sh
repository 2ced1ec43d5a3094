#!/usr/bin/env bash
# Is the eager baseline fair under load? Runs deltadit-generate and deltadit-bench on a quiet machine, then
# again while BUSY busy-loop processes (`python -c 'while True: pass'`) compete for the CPU, and prints the
# `none vs eager` ratio of each command in both runs. Target (issue 10): each ratio changes by at most ±25%
# between the quiet and the loaded run.
#
#   bash tools/fairness_bench.sh                       # the quick config (what the coordinator runs)
#   REPEATS=1 STEPS=4 BENCH_ARGS="..." bash tools/fairness_bench.sh   # a smoke test
#
# Settings (environment): REPEATS (5), THREADS (all CPUs), BUSY (2), STEPS (the manifest's), OUT_DIR
# (fairness/), BENCH_ARGS (the quick config: pixart-alpha 256 px, random weights, 12 blocks × 512),
# BENCH_MODES (eager,none), GEN_ARGS (extra deltadit-generate flags; default: the shipped pixart-digits).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT_DIR:-fairness}
REPEATS=${REPEATS:-5}
THREADS=${THREADS:-$(nproc)}
BUSY=${BUSY:-2}
STEPS=${STEPS:-}
BENCH_MODES=${BENCH_MODES:-eager,none}
BENCH_ARGS=${BENCH_ARGS:---model pixart-alpha --random-weights --resolution 256 --set num_layers=12 --set attention_head_dim=32 --out engines/pixart-alpha-256-fp32-l12-d32}
GEN_ARGS=${GEN_ARGS:-}
mkdir -p "$OUT"
steps=()
[ -n "$STEPS" ] && steps=(--steps "$STEPS")

run_both() {  # $1: quiet | loaded
  echo "== $1: deltadit-generate" >&2
  # shellcheck disable=SC2086
  "$BIN/deltadit-generate" $GEN_ARGS "${steps[@]}" --samples 1 --repeats "$REPEATS" --threads "$THREADS" \
    --out "$OUT/images-$1" -q > "$OUT/generate-$1.txt"
  echo "== $1: deltadit-bench" >&2
  # shellcheck disable=SC2086
  "$BIN/deltadit-bench" $BENCH_ARGS "${steps[@]}" --modes "$BENCH_MODES" --repeats "$REPEATS" \
    --threads "$THREADS" --json "$OUT/bench-$1.json" -q > "$OUT/bench-$1.txt"
}

busy_pids=()
stop_busy() {
  for pid in "${busy_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  busy_pids=()
}
trap stop_busy EXIT

# Export once before the quiet run (not timed; a loaded export would only be slower).
# shellcheck disable=SC2086
"$BIN/deltadit-export" $BENCH_ARGS -q > /dev/null
run_both quiet
for _ in $(seq "$BUSY"); do
  python3 -c 'while True: pass' &
  busy_pids+=("$!")
done
sleep 5  # let the busy loops show in the load average
run_both loaded
stop_busy

"$BIN/python" - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path

out = Path(sys.argv[1])
row = re.compile(r"^\s*(pytorch eager|runtime none)\s+([\d.]+) \(([\d.]+)–([\d.]+)\)", re.M)
load = re.compile(r"load average \(1 min\): ([\d.]+|n/a) before, ([\d.]+|n/a) after")


def generate(label):
    text = (out / f"generate-{label}.txt").read_text()
    ms = {m[0]: float(m[1]) for m in row.findall(text)}
    la = load.search(text)
    return ms["pytorch eager"], ms["runtime none"], la.groups() if la else ("?", "?")


def bench(label):
    r = json.loads((out / f"bench-{label}.json").read_text())
    t = r["timing"]
    return r["eager_ms"], r["full_ms"], (t["loadavg_before"], t["loadavg_after"])


rows = []
for name, read in (("deltadit-generate", generate), ("deltadit-bench", bench)):
    q_e, q_n, q_l = read("quiet")
    l_e, l_n, l_l = read("loaded")
    rq, rl = q_e / q_n, l_e / l_n
    change = rl / rq - 1
    rows.append((name, q_e, q_n, rq, q_l, l_e, l_n, rl, l_l, change))

print(f"{'command':<18} {'run':<7} {'eager ms':>10} {'none ms':>10} {'none vs eager':>14}  load avg before/after")
for name, q_e, q_n, rq, q_l, l_e, l_n, rl, l_l, change in rows:
    fmt = lambda x: x if isinstance(x, str) else f"{x:.2f}"  # noqa: E731
    print(f"{name:<18} {'quiet':<7} {q_e:>10.1f} {q_n:>10.1f} {rq:>13.2f}×  {fmt(q_l[0])} / {fmt(q_l[1])}")
    print(f"{'':<18} {'loaded':<7} {l_e:>10.1f} {l_n:>10.1f} {rl:>13.2f}×  {fmt(l_l[0])} / {fmt(l_l[1])}")
    verdict = "within ±25%: met" if abs(change) <= 0.25 else "within ±25%: MISSED"
    print(f"{'':<18} change of the ratio, loaded vs quiet: {100 * change:+.1f}% ({verdict})")
print(f"(outputs in {out}/: generate-*.txt, bench-*.txt, bench-*.json)")
PY
