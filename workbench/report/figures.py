"""Report figures: arrays and tables in, embedded images out (no torch here).

Each ``*_figure`` draws on a fresh `matplotlib.figure.Figure` (no pyplot, so no global backend
or style is touched) and returns it; `to_data_uri` turns a figure into a ``data:image/png;base64``
URI for a self-contained HTML page.
"""
from __future__ import annotations

import base64
import io
import math
from typing import Sequence

from matplotlib.figure import Figure

from workbench.errors import WorkbenchError

WIDTH, HEIGHT, DPI = 6.4, 3.4, 90


def to_data_uri(fig: Figure) -> str:
    """``data:image/png;base64,...`` of ``fig`` (PNG at `DPI`)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def spectra_figure(spectra: Sequence[dict]) -> Figure:
    """Normalised singular values ``sigma_i / sigma_1`` (log scale) of each layer, with the
    breakeven rank marked. ``spectra``: dicts with ``name``, ``singular_values``, ``breakeven_rank``."""
    fig = Figure(figsize=(WIDTH, HEIGHT))
    ax = fig.add_subplot()
    for row in spectra:
        s = row["singular_values"]
        top = s[0] if s and s[0] > 0 else 1.0
        line, = ax.semilogy(range(1, len(s) + 1), [max(v / top, 1e-8) for v in s], label=row["name"])
        b = row.get("breakeven_rank")
        if b and b <= len(s):
            ax.plot([b], [max(s[b - 1] / top, 1e-8)], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("index i (dots: breakeven rank)")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.set_title("Singular-value spectra")
    ax.legend(fontsize=8)
    return fig


def sensitivity_figure(grid: Sequence[float], curves: dict[str, Sequence[float]], baseline: float,
                       option: str, metric_name: str) -> Figure:
    """Metric with one layer compressed along ``grid`` (one line per layer), baseline dashed."""
    fig = Figure(figsize=(WIDTH, HEIGHT))
    ax = fig.add_subplot()
    for name, values in curves.items():
        ax.plot(grid, [v if v is not None and not math.isnan(v) else math.nan for v in values], "o-",
                ms=3, label=name)
    ax.axhline(baseline, ls="--", color="grey", lw=1, label="original")
    ax.set_xlabel(option)
    ax.set_ylabel(f"{metric_name} (validation)")
    ax.set_title("Sensitivity: one layer compressed at a time")
    ax.legend(fontsize=8)
    return fig


#: x axes of `pareto_figure`: name -> (point field, scale to the unit shown, axis label).
PARETO_AXES = {"bytes": ("bytes", 1 / 1024, "saved size (KiB, log)"),
               "latency": ("latency_ms", 1.0, "measured latency (ms per sample, median; bars: quartiles; log)")}
#: the spread drawn around a point's x value, per x axis: (low field, high field).
PARETO_SPREAD = {"latency": ("latency_q1_ms", "latency_q3_ms")}


def _xerr(points: Sequence[dict], x: str, field: str, scale: float):
    """``[below, above]`` distances for ``errorbar`` (0 where a point has no spread), or None."""
    low, high = PARETO_SPREAD.get(x, (None, None))
    if low is None or not any(p.get(low) is not None and p.get(high) is not None for p in points):
        return None
    below = [(p[field] - p[low]) * scale if p.get(low) is not None else 0.0 for p in points]
    above = [(p[high] - p[field]) * scale if p.get(high) is not None else 0.0 for p in points]
    return [below, above]


def pareto_figure(points: Sequence[dict], front: Sequence[str], chosen: dict | None,
                  metric_name: str, x: str = "bytes") -> Figure:
    """Metric against saved kilobytes (``x="bytes"``) or measured ms (``x="latency"``) of every
    measured option; the Pareto front (labels in ``front``, computed on the same axis) joined.
    Points without a value on the axis are left out. On the latency axis a point with quartiles
    (``latency_q1_ms``, ``latency_q3_ms``) gets them as a horizontal error bar around its median."""
    if x not in PARETO_AXES:
        raise WorkbenchError(f"x={x!r} must be one of {', '.join(PARETO_AXES)} (the Pareto chart's x axis)")
    field, scale, label = PARETO_AXES[x]
    points = [p for p in points if p.get(field) is not None]
    if not points:
        raise WorkbenchError(f"no point has a measured {field}; measure them with latency=True for x={x!r}")
    fig = Figure(figsize=(WIDTH, HEIGHT))
    ax = fig.add_subplot()
    families = list(dict.fromkeys(p["method"] for p in points))
    colors = {name: f"C{i % 10}" for i, name in enumerate(families)}
    for name in families:
        mine = [p for p in points if p["method"] == name]
        marker = "*" if name == "original" else "o"
        ax.errorbar([p[field] * scale for p in mine], [p["metric"] for p in mine], xerr=_xerr(mine, x, field, scale),
                    fmt=marker, color=colors[name], ms=9 if marker == "*" else 5, alpha=0.85, label=name,
                    elinewidth=1, capsize=2)
    on_front = sorted((p for p in points if p["label"] in front), key=lambda p: p[field])
    if on_front:
        ax.plot([p[field] * scale for p in on_front], [p["metric"] for p in on_front], "k-", lw=1,
                label="Pareto front")
    if chosen and chosen.get(field) is not None:
        ax.plot(chosen[field] * scale, chosen["metric"], "s", mfc="none", mec="red", ms=10, label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(f"{metric_name} (test)")
    ax.set_title("Every method, measured")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return fig


def recovery_figure(history: Sequence[dict], start: dict, metric_name: str) -> Figure:
    """Validation metric per fine-tuning epoch (epoch 0: before training)."""
    fig = Figure(figsize=(WIDTH, HEIGHT * 0.8))
    ax = fig.add_subplot()
    epochs = [0] + [h["epoch"] for h in history]
    ax.plot(epochs, [start.get("metric", math.nan)] + [h["metric"] for h in history], "o-")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric_name} (validation)")
    ax.set_title("Recovery by distillation")
    return fig


def measures_figure(labels: Sequence[str], latency_ms: Sequence[float], sizes_kib: Sequence[float]) -> Figure:
    """Side-by-side bars: latency at the large batch and saved size, for each model."""
    fig = Figure(figsize=(WIDTH, HEIGHT * 0.8))
    left, right = fig.subplots(1, 2)
    left.bar(labels, latency_ms, color=["#888", "#c33"][: len(labels)])
    left.set_ylabel("ms (large batch, median)")
    right.bar(labels, sizes_kib, color=["#888", "#c33"][: len(labels)])
    right.set_ylabel("KiB (safetensors)")
    fig.suptitle("Measured size and speed")
    fig.tight_layout()
    return fig
