"""What an export reports: one row per segment (precision, blocks, size, time, measured error and its limit)
and the summary the command prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runtime.manifest import Manifest

@dataclass
class SegmentReport:
    name: str
    blocks: str
    params: int
    bytes: int
    seconds: float
    rel_err: float | None
    precision: str = "fp32"
    tolerance: float | None = None  # the limit rel_err was held to
    worst_batch: int | None = None


def format_reports(reports: list[SegmentReport]) -> list[str]:
    """The per-segment table of the export's summary (also shown when the int8 gate refuses)."""
    lines = [f"{'segment':<8} {'precision':>9} {'blocks':>8} {'params':>12} {'file MB':>9} {'export s':>9} "
             f"{'max rel err':>12} {'limit':>7}"]
    for r in reports:
        err = "-" if r.rel_err is None else f"{r.rel_err:.2e}"
        limit = "-" if r.tolerance is None else f"{r.tolerance:.0e}"
        above = r.rel_err is not None and r.tolerance is not None and r.rel_err > r.tolerance
        flag = "  ← above the limit" if above else ""
        lines.append(f"{r.name:<8} {r.precision:>9} {r.blocks:>8} {r.params:>12,} {r.bytes / 2**20:>9.1f} "
                     f"{r.seconds:>9.1f} {err:>12} {limit:>7}{flag}")
    return lines


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    reused: bool
    reports: list[SegmentReport] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.reused:
            return f"reused the existing export at {self.out} (same weights and options; --force rebuilds)"
        lines = format_reports(self.reports)
        chain = self.manifest.export.get("chain_rel_err")
        if chain is not None:
            lines.append(f"whole chain (the engines in sequence) vs the fp32 torch model at batch 2: max rel err "
                         f"{chain:.2e} (not gated: the per-segment errors compound)")
        total = sum(r.bytes for r in self.reports) / 2**20
        lines.append(f"total {total:.1f} MB in {self.seconds:.1f} s → {self.out}")
        return "\n".join(lines + self.notes)

