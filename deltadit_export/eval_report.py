"""The report of ``deltadit-eval``: the table, the speedup-vs-FD plot, the verdicts against the targets,
and JSON helpers."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

from .imaging import comparison_image, grid_image, save_png, to_uint8
from .publish import write_file

TARGETS = {"speedup": 1.5, "accuracy_points": 2.0, "fd_relative": 0.10}
# The quality gate of a reduced precision (issue 12 §4): against fp32 at the same schedule, class accuracy at
# most 1 point lower and FD at most 5% higher. A precision that fails it stays off by default for the model.
GATE = {"accuracy_points": 1.0, "fd_relative": 0.05}


def _fmt(v: float | None, spec: str, inf: str = "∞") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return inf
    return format(v, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'row':<26} {'engine':<8} {'T':>3} {'bound':>6} {'ms/img':>7} {'min–max':>13} {'speedup':>8} "
            f"{'acc %':>6} {'FD':>7} {'±':>5} {'PSNR dB':>8} {'max|Δ|':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        spread = (f"{r['latency_min_ms']:.1f}–{r['latency_max_ms']:.1f}" if r.get("latency_min_ms") is not None
                  else "-")
        lines.append(
            f"{r['name']:<26} {r['engine']:<8} {r['num_steps']:>3} {_fmt(r['bound'], '.2f'):>6} "
            f"{_fmt(r['latency_ms'], '.1f'):>7} {spread:>13} {_fmt(r['speedup'], '.2f'):>7}× "
            f"{100 * r['accuracy']:>6.1f} {r['fd']:>7.2f} {_fmt(r.get('fd_bootstrap_std'), '.2f'):>5} "
            f"{_fmt(r['psnr'], '.1f'):>8} {_fmt(r['max_abs'], '.3f'):>7}")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=100)
    full = next(r for r in rows if r["name"] == "full")
    ax.axhline(full["fd"], color="0.6", lw=0.8, ls="--", label="full compute FD")
    ax.axhspan(full["fd"], full["fd"] * (1 + TARGETS["fd_relative"]), color="0.9", label="within 10% of full FD")
    pts = [r for r in rows if r["speedup"] is not None]
    for r in pts:
        style = {"runtime": ("o", "C0"), "pytorch": ("s", "C1")}[r["engine"]]
        if r["name"].startswith("delta-dit"):
            style = ("*", "C3")
        ax.scatter(r["speedup"], r["fd"], marker=style[0], color=style[1], s=80 if style[0] == "*" else 36, zorder=3)
    # Labels: stack the ones of nearby points vertically so that they stay readable.
    xs = [r["speedup"] for r in pts]
    ys = [r["fd"] for r in pts]
    xr = (max(xs) - min(xs)) or 1.0
    yr = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for r in sorted(pts, key=lambda r: (r["fd"], r["speedup"])):
        near = sum(1 for (x, y) in placed if abs(x - r["speedup"]) / xr < 0.12 and abs(y - r["fd"]) / yr < 0.06)
        placed.append((r["speedup"], r["fd"]))
        ax.annotate(r["name"], (r["speedup"], r["fd"]), textcoords="offset points", xytext=(5, -3 + 9 * near),
                    fontsize=7)
    ax.scatter([], [], marker="o", color="C0", label="deltadit runtime (ONNX Runtime) vs its full compute")
    ax.scatter([], [], marker="s", color="C1", label="diffusers hooks (PyTorch) vs PyTorch full compute")
    ax.set_xlabel("measured speedup over full compute (per image, guidance batch 2)")
    ax.set_ylabel("Fréchet distance to real digits (classifier features)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_file(path, buf.getvalue())


def verdicts(rows: dict[str, dict[str, Any]], boot: dict[str, np.ndarray] | None = None) -> list[str]:
    """Plain sentences: targets met or not, and whether delta-dit beats fewer steps and the output cache.

    With ``boot`` (paired bootstrap FDs per row), each FD comparison also gets the 95% interval of the
    FD difference, so a reader can tell a real difference from sampling noise."""
    full, d = rows["full"], rows["delta-dit"]
    out = []
    acc_gap = 100 * (full["accuracy"] - d["accuracy"])
    fd_rel = d["fd"] / full["fd"] - 1 if full["fd"] > 0 else float("inf")
    checks = [
        (f"delta-dit measured speedup {d['speedup']:.2f}× ≥ {TARGETS['speedup']}×", d["speedup"] >= TARGETS["speedup"]),
        (f"delta-dit accuracy {100 * d['accuracy']:.1f}% within {TARGETS['accuracy_points']:.0f} points of full "
         f"{100 * full['accuracy']:.1f}% (gap {acc_gap:+.1f})", acc_gap <= TARGETS["accuracy_points"]),
        (f"delta-dit FD {d['fd']:.2f} within {100 * TARGETS['fd_relative']:.0f}% of full {full['fd']:.2f} "
         f"({100 * fd_rel:+.1f}%)", fd_rel <= TARGETS["fd_relative"]),
    ]
    out += [f"target {'MET' if ok else 'MISSED'}: {text}" for text, ok in checks]

    for name, r in rows.items():
        if name.startswith("fewer steps") or name == "output-cache":
            out.append(compare_rows(d, r, boot))
    return out


def compare_rows(d: dict[str, Any], other: dict[str, Any], boot: dict[str, np.ndarray] | None = None) -> str:
    """One sentence: does ``d`` beat ``other`` on quality (lower FD and accuracy at least as high)?"""
    fd_better, fd_worse = d["fd"] < other["fd"], d["fd"] > other["fd"]
    acc_better, acc_worse = d["accuracy"] > other["accuracy"], d["accuracy"] < other["accuracy"]
    if (fd_better and not acc_worse) or (acc_better and not fd_worse):
        word = "beats"
    elif (fd_worse and not acc_better) or (acc_worse and not fd_better):
        word = "does NOT beat"
    elif not (fd_better or fd_worse or acc_better or acc_worse):
        word = "ties with"
    else:
        word = "is mixed against"
    return (f"{d['name']} {word} {other['name']} on quality: FD {d['fd']:.2f} vs {other['fd']:.2f}, accuracy "
            f"{100 * d['accuracy']:.1f}% vs {100 * other['accuracy']:.1f}%, PSNR vs full {_fmt(d['psnr'], '.1f')} vs "
            f"{_fmt(other['psnr'], '.1f')} dB; bound {_fmt(d.get('bound'), '.2f')}× vs {_fmt(other.get('bound'), '.2f')}×, "
            f"measured speedup {_fmt(d.get('speedup'), '.2f')}× vs {_fmt(other.get('speedup'), '.2f')}×"
            + _fd_interval(d, other, boot))


def _fd_interval(d, other, boot) -> str:
    if not boot or d["name"] not in boot or other["name"] not in boot:
        return ""
    diff = boot[d["name"]] - boot[other["name"]]
    lo, hi = np.percentile(diff, [2.5, 97.5])
    sig = "significant" if (lo > 0 or hi < 0) else "not significant"
    return (f"; FD difference {d['fd'] - other['fd']:+.2f}, paired-bootstrap 95% interval [{lo:+.2f}, {hi:+.2f}] "
            f"({sig})")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _finite(o):
    """JSON has no infinity: ``inf`` (PSNR of identical sets) becomes null."""
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and math.isinf(o):
        return None
    return str(o)


def _relative_fd_interval(boot, name: str, ref: str) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of FD(name) / FD(ref) − 1 (same resampled indices for both rows)."""
    if not boot or name not in boot or ref not in boot:
        return None
    lo, hi = np.percentile(boot[name] / boot[ref] - 1, [2.5, 97.5])
    return float(lo), float(hi)


def gate_check(row: dict[str, Any], ref: dict[str, Any], boot=None) -> dict[str, Any]:
    """One comparison of the gate: ``row`` against ``ref`` (fp32 at the same schedule)."""
    gap = 100 * (ref["accuracy"] - row["accuracy"])  # points lost (negative: gained)
    fd_rel = row["fd"] / ref["fd"] - 1 if ref["fd"] > 0 else float("inf")
    interval = _relative_fd_interval(boot, row["name"], ref["name"])
    return {"row": row["name"], "reference": ref["name"], "accuracy": row["accuracy"],
            "reference_accuracy": ref["accuracy"], "accuracy_gap_points": gap,
            "accuracy_ok": gap <= GATE["accuracy_points"] + 1e-9, "fd": row["fd"], "reference_fd": ref["fd"],
            "fd_relative": fd_rel, "fd_ok": fd_rel <= GATE["fd_relative"], "fd_relative_interval": interval,
            "ok": gap <= GATE["accuracy_points"] + 1e-9 and fd_rel <= GATE["fd_relative"]}


def precision_gate(rows: dict[str, dict[str, Any]], precision: str, boot=None) -> dict[str, Any] | None:
    """The gate of ``precision``: its full row against fp32 ``full`` and its delta-dit row against fp32
    ``delta-dit`` (what the precision changes, at the same schedule). None when its rows did not run.
    Also, for the record (not gated), its delta-dit row against fp32 full compute."""
    pairs = [(f"{precision} full", "full"), (f"{precision} delta-dit", "delta-dit")]
    checks = [gate_check(rows[a], rows[b], boot) for a, b in pairs if a in rows and b in rows]
    if not checks:
        return None
    extra = (gate_check(rows[f"{precision} delta-dit"], rows["full"], boot)
             if f"{precision} delta-dit" in rows and "full" in rows else None)
    return {"precision": precision, "passed": all(c["ok"] for c in checks) and len(checks) == len(pairs),
            "complete": len(checks) == len(pairs), "checks": checks, "delta_vs_fp32_full": extra, "gate": GATE}


def _check_text(c: dict[str, Any], judged: bool = True) -> str:
    iv = c["fd_relative_interval"]
    interval = "" if iv is None else f", paired-bootstrap 95% interval [{100 * iv[0]:+.1f}%, {100 * iv[1]:+.1f}%]"
    if judged and iv is not None and iv[0] <= GATE["fd_relative"] < iv[1]:
        interval += " (straddles the limit)"
    acc_limit = f", limit −{GATE['accuracy_points']:g}: {'ok' if c['accuracy_ok'] else 'FAILED'}" if judged else ""
    fd_limit = f", limit +{100 * GATE['fd_relative']:g}%" if judged else ""
    fd_word = f": {'ok' if c['fd_ok'] else 'FAILED'}" if judged else ""
    return (f"{c['row']} vs fp32 {c['reference']}: accuracy {100 * c['accuracy']:.1f}% vs "
            f"{100 * c['reference_accuracy']:.1f}% ({0.0 - c['accuracy_gap_points'] + 0.0:+.1f} points{acc_limit}), FD "
            f"{c['fd']:.2f} vs {c['reference_fd']:.2f} ({100 * c['fd_relative']:+.1f}%{fd_limit}{interval}{fd_word})")


def gate_lines(gate: dict[str, Any] | None, precision: str, missing: str | None = None) -> list[str]:
    """The verdict line of one precision, then one line per comparison."""
    if gate is None:
        return [f"precision gate {precision}: NOT MEASURED ({missing or 'its rows did not run'})"]
    verdict = "PASSED" if gate["passed"] else ("INCOMPLETE" if not gate["complete"] else "FAILED")
    lines = [f"precision gate {precision}: {verdict} (accuracy within {GATE['accuracy_points']:g} point and FD within "
             f"+{100 * GATE['fd_relative']:g}% of fp32 at the same schedule)"]
    lines += [f"  {_check_text(c)}" for c in gate["checks"]]
    if gate["delta_vs_fp32_full"] is not None:
        lines.append(f"  for the record (not gated): {_check_text(gate['delta_vs_fp32_full'], judged=False)}")
    return lines


def write_figures(ordered: list[dict[str, Any]], samples: dict[str, "torch.Tensor"], per: int, out_dir: Path,
                  title: str) -> list[Path]:
    """speedup_vs_fd.png, samples_delta-dit.png (one row per digit), compare_full_vs_delta-dit.png."""
    plot_path = plot(ordered, out_dir / "speedup_vs_fd.png", title)
    grid_idx = np.concatenate([np.arange(min(10, per)) + d * per for d in range(10)])
    grid_path = save_png(grid_image(to_uint8(samples["delta-dit"][grid_idx]), cols=min(10, per), scale=3),
                         out_dir / "samples_delta-dit.png")
    cmp_path = save_png(comparison_image(samples["full"][grid_idx], samples["delta-dit"][grid_idx], 10,
                                         min(10, per), shown=min(3, per)), out_dir / "compare_full_vs_delta-dit.png")
    return [plot_path, grid_path, cmp_path]
