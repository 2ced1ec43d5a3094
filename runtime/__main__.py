"""``deltadit-runtime`` (or ``python -m runtime``): inspect an export without loading any engine.

    deltadit-runtime info engines/pixart-digits-16-fp32          # model, segments, I/O, files verified
    deltadit-runtime schedule engines/pixart-digits-16-fp32 --policy delta-dit --steps 20
"""

from __future__ import annotations

import argparse
import sys

from .integrity import verify_companion_files, verify_segment_files
from .manifest import ManifestError, load_manifest
from .schedule import POLICY_NAMES, ScheduleError, build_schedule, scaled_boundary


def _info(args) -> str:
    m = load_manifest(args.folder)
    if not args.no_verify:
        verify_segment_files(m)
        verify_companion_files(m)
    lines = [
        f"{m.model['name']} ({m.model['diffusers_class']}, {m.model.get('params', 0):,} params), "
        f"resolution {m.resolution}, sample {list(m.sample_shape)}, {m.precision}, batch 1..{m.max_batch}",
        f"L={m.num_layers} N_c={m.cached_blocks} cuts a={m.cuts['a']} c={m.cuts['c']}; default schedule "
        f"T={m.schedule['num_steps']} N={m.schedule['interval']} b={m.schedule['boundary']}",
        f"files {'verified (sha256)' if not args.no_verify else 'not verified'}",
    ]
    for s in m.segments:
        blocks = f"blocks {s.blocks[0]}..{s.blocks[1] - 1}" if s.blocks else s.role
        ins = ", ".join(f"{t.name}{list(t.shape)}" for t in s.inputs)
        outs = ", ".join(f"{t.name}{list(t.shape)}" for t in s.outputs)
        lines.append(f"  {s.name:<7} {blocks:<14} {s.file}: ({ins}) -> ({outs})")
    for backend, entry in m.engines.items():
        lines.append(f"  engines[{backend}]: {', '.join(sorted(entry)) if isinstance(entry, dict) else entry}")
    return "\n".join(lines)


def _schedule(args) -> str:
    m = load_manifest(args.folder)
    d = m.schedule
    steps = args.steps if args.steps is not None else d["num_steps"]
    boundary = args.boundary
    if boundary is None:
        boundary = scaled_boundary(d["boundary"], d["num_steps"], steps)
    return build_schedule(args.policy, num_steps=steps, num_layers=m.num_layers, cached_blocks=m.cached_blocks,
                          interval=args.interval if args.interval is not None else d["interval"],
                          boundary=boundary).format()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltadit-runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe an export folder and verify its files")
    info.add_argument("folder")
    info.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the segment files")
    sched = sub.add_parser("schedule", help="print the per-step plan for an export")
    sched.add_argument("folder")
    sched.add_argument("--policy", default="delta-dit", choices=POLICY_NAMES)
    sched.add_argument("--steps", type=int, default=None)
    sched.add_argument("--interval", type=int, default=None)
    sched.add_argument("--boundary", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        print(_info(args) if args.command == "info" else _schedule(args))
    except (ManifestError, ScheduleError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
