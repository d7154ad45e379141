"""Figures of lesson 09 (arrays in, artists out; no torch): each ``draw_*`` builds artists once,
each ``update_*`` only changes their data.

* magnitude histogram on a log axis with the pruning cut, and accuracy against sparsity;
* latency bars (median) with the spread (quartiles) as error bars;
* file sizes per format, dense beside compressed;
* one sensitivity curve per layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes

LOG_EDGES = np.logspace(-6, 0.5, 56)  # |w| bins: 1e-6 .. ~3 (weights below 1e-6 land in the first bin)


@dataclass
class MagnitudeArtists:
    bars: list
    cut: object
    ax: Axes


def magnitude_counts(magnitudes: np.ndarray) -> np.ndarray:
    """Counts of ``|w|`` in `LOG_EDGES` (values outside are clipped into the end bins)."""
    clipped = np.clip(np.abs(magnitudes), LOG_EDGES[0], LOG_EDGES[-1])
    return np.histogram(clipped, LOG_EDGES)[0]


def draw_magnitudes(ax: Axes, threshold: float) -> MagnitudeArtists:
    """Empty log-x histogram of weight magnitudes with a vertical cut at ``threshold``."""
    widths = np.diff(LOG_EDGES)
    bars = list(ax.bar(LOG_EDGES[:-1], np.zeros(len(widths)), width=widths, align="edge", color="C0"))
    ax.set_xscale("log")
    cut = ax.axvline(threshold, color="C3", linestyle="--", label=f"cut |w| = {threshold:g}")
    ax.set_xlabel("|w| (log scale)")
    ax.set_ylabel("number of weights")
    ax.legend(loc="upper left", fontsize="small")
    return MagnitudeArtists(bars, cut, ax)


def update_magnitudes(artists: MagnitudeArtists, magnitudes: np.ndarray, title: str) -> None:
    counts = magnitude_counts(magnitudes)
    for bar, count in zip(artists.bars, counts):
        bar.set_height(count)
    artists.ax.set_ylim(0, max(1, counts.max()) * 1.1)
    artists.ax.set_title(title, fontsize="medium")


@dataclass
class ScatterArtists:
    seen: object
    current: object
    ax: Axes


def draw_accuracy_sparsity(ax: Axes, baseline: float, metric_name: str = "accuracy") -> ScatterArtists:
    """Accuracy (y) against fraction of weights pruned (x, in %) with the dense baseline."""
    ax.axhline(baseline, color="0.5", linestyle=":", label=f"original {baseline:.3f}")
    seen, = ax.plot([], [], "o", color="C0", alpha=0.5, label="strengths tried")
    current, = ax.plot([], [], "o", color="C3", markersize=10, label="this strength")
    ax.set_xlim(0, 100)
    ax.set_xlabel("weights pruned (%)")
    ax.set_ylabel(f"test {metric_name} after the cut")
    ax.legend(loc="lower left", fontsize="small")
    return ScatterArtists(seen, current, ax)


def update_accuracy_sparsity(artists: ScatterArtists, seen: Sequence[tuple[float, float]],
                             current: tuple[float, float]) -> None:
    """``seen`` / ``current``: (pruned fraction in [0, 1], metric) points."""
    xs = [100 * s for s, _ in seen]
    artists.seen.set_data(xs, [m for _, m in seen])
    artists.current.set_data([100 * current[0]], [current[1]])
    low = min([m for _, m in seen] + [current[1], artists.ax.get_ylim()[0]])
    artists.ax.set_ylim(max(0.0, low - 0.05), 1.02)


@dataclass
class BarArtists:
    bars: list
    errors: object
    labels: list
    ax: Axes


def draw_latency_bars(ax: Axes, names: Sequence[str]) -> BarArtists:
    """One bar per model (median latency) with quartile error bars; heights set by `update_latency_bars`."""
    x = np.arange(len(names))
    bars = list(ax.bar(x, np.zeros(len(names)), color=[f"C{i}" for i in range(len(names))]))
    errors = ax.errorbar(x, np.zeros(len(names)), yerr=np.zeros((2, len(names))), fmt="none", ecolor="k",
                         capsize=6)
    labels = [ax.text(i, 0, "", ha="center", va="bottom", fontsize="small") for i in x]
    ax.set_xticks(x, names)
    ax.set_ylabel("latency (ms, median; bars: quartiles)")
    return BarArtists(bars, errors, labels, ax)


def update_latency_bars(artists: BarArtists, timings: Sequence[dict], title: str) -> None:
    """``timings``: one ``{"median_ms", "q1_ms", "q3_ms"}`` per bar."""
    medians = np.array([t["median_ms"] for t in timings])
    low = medians - np.array([t["q1_ms"] for t in timings])
    high = np.array([t["q3_ms"] for t in timings]) - medians
    for bar, label, median, top in zip(artists.bars, artists.labels, medians, medians + high):
        bar.set_height(median)
        label.set_position((bar.get_x() + bar.get_width() / 2, top))
        label.set_text(f"{median:.3f} ms")
    artists.errors.remove()
    x = [bar.get_x() + bar.get_width() / 2 for bar in artists.bars]
    artists.errors = artists.ax.errorbar(x, medians, yerr=np.vstack([low, high]), fmt="none", ecolor="k",
                                         capsize=6)
    artists.ax.set_ylim(0, float((medians + high).max()) * 1.25)
    artists.ax.set_title(title, fontsize="medium")


def draw_size_bars(ax: Axes, formats: Sequence[str]) -> BarArtists:
    """Pairs of bars per file format: dense (grey) and compressed (blue), in KiB."""
    x = np.arange(len(formats))
    dense = ax.bar(x - 0.2, np.zeros(len(formats)), width=0.4, color="0.6", label="dense")
    compressed = ax.bar(x + 0.2, np.zeros(len(formats)), width=0.4, color="C0", label="compressed")
    labels = [ax.text(i + 0.2, 0, "", ha="center", va="bottom", fontsize="small") for i in x]
    ax.set_xticks(x, formats)
    ax.set_ylabel("file size (KiB)")
    ax.legend(loc="upper right", fontsize="small")
    return BarArtists([*dense, *compressed], None, labels, ax)


def update_size_bars(artists: BarArtists, dense: Sequence[int], compressed: Sequence[int], title: str) -> None:
    """``dense`` / ``compressed``: bytes per format, in the order of `draw_size_bars`."""
    n = len(dense)
    for bar, size in zip(artists.bars, [*dense, *compressed]):
        bar.set_height(size / 1024)
    for label, bar, d, c in zip(artists.labels, artists.bars[n:], dense, compressed):
        label.set_position((bar.get_x() + bar.get_width() / 2, c / 1024))
        label.set_text(f"{c / d:.0%}")
    artists.ax.set_ylim(0, max([*dense, *compressed]) / 1024 * 1.2)
    artists.ax.set_title(title, fontsize="medium")


@dataclass
class CurveSet:
    lines: list
    ax: Axes


def draw_layer_curves(ax: Axes, layers: Sequence[str], baseline: float, metric_name: str = "accuracy") -> CurveSet:
    """One line per layer (distinct colours, legend) and the uncompressed baseline."""
    ax.axhline(baseline, color="0.5", linestyle=":", label="uncompressed")
    lines = [ax.plot([], [], "o-", color=f"C{i}", label=name)[0] for i, name in enumerate(layers)]
    ax.set_ylabel(f"validation {metric_name}")
    ax.legend(loc="lower right", fontsize="small")
    return CurveSet(lines, ax)


def update_layer_curves(artists: CurveSet, grid: Sequence[float], metric: Sequence[Sequence[float]],
                        xlabel: str, title: str) -> None:
    """``metric[i][j]``: layer ``i`` compressed alone at ``grid[j]``."""
    for line, row in zip(artists.lines, metric):
        line.set_data(grid, row)
    artists.ax.set_xlim(min(grid) - 0.05 * (max(grid) - min(grid) or 1), max(grid) * 1.05 + 0.01)
    lowest = min(min(row) for row in metric)
    artists.ax.set_ylim(max(0.0, lowest - 0.05), 1.03)
    artists.ax.set_xlabel(xlabel)
    artists.ax.set_title(title, fontsize="medium")
