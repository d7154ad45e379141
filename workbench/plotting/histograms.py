"""Weight histograms with a pruning cut or a quantization grid drawn over them, and a per-layer
sparsity heatmap. Arrays in, matplotlib artists out; ``update_*`` change artist data in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.patches import StepPatch
from matplotlib.text import Text


@dataclass
class HistogramArtists:
    """A weight histogram (``bars``: counts per bin over ``edges``) on ``ax``."""

    ax: Axes
    bars: StepPatch
    edges: np.ndarray


def histogram_counts(values: np.ndarray, bins: int = 80, limit: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(counts (bins,), edges (bins + 1,))`` of ``values`` over ``[-limit, limit]`` (default max|v|)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    limit = float(np.abs(values).max()) if limit is None else float(limit)
    limit = limit if limit > 0 else 1.0
    return np.histogram(values, bins=bins, range=(-limit, limit))


def draw_weight_histogram(ax: Axes, values: np.ndarray, bins: int = 80, title: str = "") -> HistogramArtists:
    """Histogram of weight ``values`` (any shape), log-scaled counts."""
    counts, edges = histogram_counts(values, bins)
    bars = ax.stairs(counts, edges, fill=True, alpha=0.6, color="C0")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count (log scale)")
    if title:
        ax.set_title(title, fontsize="medium")
    return HistogramArtists(ax, bars, edges)


def update_weight_histogram(artists: HistogramArtists, values: np.ndarray, title: str | None = None) -> None:
    """Show new ``values`` (another layer) in the same artists; rescales the axes."""
    counts, edges = histogram_counts(values, len(artists.edges) - 1)
    artists.bars.set_data(counts, edges)
    artists.edges = edges
    artists.ax.set_xlim(edges[0], edges[-1])
    artists.ax.set_ylim(0, max(1.0, float(counts.max())) * 1.5)
    if title is not None:
        artists.ax.set_title(title, fontsize="medium")


@dataclass
class CutArtists:
    """The two lines at ``-threshold`` and ``+threshold``: weights between them are pruned."""

    low: Line2D
    high: Line2D


def draw_cut(ax: Axes, threshold: float) -> CutArtists:
    low = ax.axvline(-threshold, color="C3", lw=1.5)
    high = ax.axvline(threshold, color="C3", lw=1.5, label="pruning cut |w| = t")
    ax.legend(loc="upper right", fontsize="small")
    return CutArtists(low, high)


def update_cut(artists: CutArtists, threshold: float) -> None:
    artists.low.set_xdata([-threshold, -threshold])
    artists.high.set_xdata([threshold, threshold])


def draw_grid(ax: Axes, levels: Sequence[float], color: str = "C3", label: str = "grid") -> LineCollection:
    """Vertical lines at the representable values ``levels`` over the histogram (axes-height)."""
    lines = ax.vlines(np.asarray(levels, dtype=float), 0, 1, transform=ax.get_xaxis_transform(),
                      colors=color, lw=0.8, label=label)
    ax.legend(loc="upper right", fontsize="small")
    return lines


def update_grid(lines: LineCollection, levels: Sequence[float], widen: bool = False) -> None:
    """Move the grid lines to ``levels``; ``widen``: grow the x limits (5% margin) so that every
    level is inside the axes (a level at the edge of the histogram would be hidden)."""
    levels = np.asarray(levels, dtype=float)
    lines.set_segments([[(x, 0.0), (x, 1.0)] for x in levels])
    if widen and levels.size:
        lo, hi = lines.axes.get_xlim()
        margin = 0.05 * max(hi - lo, float(np.ptp(levels)))
        lines.axes.set_xlim(min(lo, levels.min() - margin), max(hi, levels.max() + margin))


@dataclass
class HeatmapArtists:
    """A 1 x n_layers image of sparsity with the value written in each cell."""

    image: AxesImage
    labels: list[Text]


def draw_sparsity_heatmap(ax: Axes, names: Sequence[str], sparsities: Sequence[float]) -> HeatmapArtists:
    """Per-layer sparsity (fraction of weights removed, 0..1) as a one-row heatmap."""
    data = np.asarray(sparsities, dtype=float)[None, :]
    image = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
    ax.set_yticks([])
    ax.set_title("fraction of weights removed", fontsize="medium")
    labels = [ax.text(i, 0, f"{s:.0%}", ha="center", va="center", color="w", fontsize="small")
              for i, s in enumerate(data[0])]
    return HeatmapArtists(image, labels)


def update_sparsity_heatmap(artists: HeatmapArtists, sparsities: Sequence[float]) -> None:
    data = np.asarray(sparsities, dtype=float)[None, :]
    artists.image.set_data(data)
    for label, s in zip(artists.labels, data[0]):
        label.set_text(f"{s:.0%}")
        label.set_color("k" if s > 0.6 else "w")
