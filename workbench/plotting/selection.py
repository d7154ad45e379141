"""Figures for choosing: sensitivity curves and heatmap, chosen ranks on spectra, Pareto charts.

Functions take plain arrays / lists and a matplotlib ``Axes`` and return the artists they drew
(no torch here), so widgets can update them in place.
"""
from __future__ import annotations

from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.ticker import FuncFormatter

#: the most series a chart labels in its legend; `group_series` folds the rest into "other".
MAX_SERIES = 8


def draw_sensitivity_curves(ax, grid: Sequence[float], metric: Sequence[Sequence[float]],
                            layers: Sequence[str], baseline: float | None = None,
                            xlabel: str = "kept ratio", ylabel: str = "accuracy") -> list:
    """One line per layer: ``metric[i][j]`` against ``grid[j]``; a dashed line at ``baseline``."""
    artists = [ax.plot(grid, row, marker="o", label=name)[0] for name, row in zip(layers, metric)]
    if baseline is not None:
        artists.append(ax.axhline(baseline, color="0.4", linestyle="--", linewidth=1, label="original"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("sensitivity: one layer compressed, the others intact")
    ax.legend(fontsize="small")
    return artists


def draw_sensitivity_heatmap(ax, grid: Sequence[float], metric: Sequence[Sequence[float]],
                             layers: Sequence[str], baseline: float, xlabel: str = "kept ratio",
                             higher_is_better: bool = True):
    """Heatmap of the loss of quality (layers x grid), annotated; returns the image.

    The loss is ``baseline - metric`` for a metric where higher is better (accuracy), and
    ``metric - baseline`` where lower is better (perplexity): positive always means worse.
    """
    drop = np.asarray(metric, dtype=float)
    drop = baseline - drop if higher_is_better else drop - baseline
    image = ax.imshow(drop, aspect="auto", cmap="magma_r", vmin=0, vmax=max(float(np.nanmax(drop)), 1e-6))
    crowded = len(grid) > 8  # rotate the column labels and shorten the cell texts so they do not overlap
    ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid], rotation=90 if crowded else 0,
                  fontsize="small" if crowded else None)
    ax.set_yticks(range(len(layers)), list(layers))
    ax.set_xlabel(xlabel)
    ax.set_title("metric drop")
    for i in range(drop.shape[0]):
        for j in range(drop.shape[1]):
            if np.isfinite(drop[i, j]):
                text = f"{drop[i, j]:.2f}".replace("0.", ".", 1) if crowded else f"{drop[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6 if crowded else 7,
                        color="white" if drop[i, j] > 0.5 * np.nanmax(drop) else "black")
    ax.figure.colorbar(image, ax=ax, label="drop")
    return image


def draw_ranks_on_spectra(ax, spectra: dict[str, Sequence[float]],
                          ranks: dict[str, dict[str, int | None]], floor: float | None = 1e-6) -> list:
    """Each layer's normalized singular values (log scale) with a marker at the rank each
    allocator chose; ``ranks = {allocator: {layer: rank or None (dense)}}``.

    ``floor``: values below ``floor * sigma_1`` are numerical zeros (a layer whose input has
    constant-zero columns, such as blank border pixels, has exact zero singular values that SVD
    returns as ~1e-16): they are not drawn and the y axis stops at ``floor``. None draws all.
    Two legends: the layers (colours) and the allocators (marker shapes)."""
    artists, layer_lines, shape_handles = [], [], []
    markers = ["o", "s", "^", "D", "v", "P"]
    for name, s in spectra.items():
        s = np.asarray(s, dtype=float)
        s = s / s[0] if len(s) and s[0] > 0 else s
        shown = s if floor is None else np.where(s >= floor, s, np.nan)
        (line,) = ax.semilogy(np.arange(1, len(s) + 1), shown, label=name)
        artists.append(line)
        layer_lines.append(line)
        for k, chosen in enumerate(ranks.values()):
            rank = chosen.get(name)
            if rank is not None and 1 <= rank <= len(s) and np.isfinite(shown[rank - 1]):
                artists.append(ax.plot(rank, s[rank - 1], markers[k % len(markers)], color=line.get_color(),
                                       markersize=8, markerfacecolor="none")[0])
    for k, allocator in enumerate(ranks):
        shape_handles.append(ax.plot([], [], markers[k % len(markers)], color="0.2", markerfacecolor="none",
                                     label=allocator)[0])
    if floor is not None:
        ax.set_ylim(bottom=floor)
    ax.set_xlabel("singular value index i (= rank kept)")
    ax.set_ylabel("sigma_i / sigma_1 (log scale)")
    ax.set_title("chosen ranks on the spectra (no marker: that layer stays dense)")
    first = ax.legend(handles=layer_lines, title="layer", fontsize="small", loc="upper right")
    ax.add_artist(first)
    ax.legend(handles=shape_handles, title="allocator", fontsize="small", loc="lower left")
    return artists


def group_series(kinds: Sequence[str], max_series: int = MAX_SERIES) -> list[str]:
    """``kinds`` with all but the first ``max_series - 1`` distinct values renamed "other" when
    there are more than ``max_series`` distinct values (a legend stays readable)."""
    distinct = list(dict.fromkeys(kinds))
    if len(distinct) <= max_series:
        return list(kinds)
    keep = set(distinct[:max_series - 1])
    return [k if k in keep else "other" for k in kinds]


def compact_number(value: float, _pos=None) -> str:
    """Tick text for a log axis: 20000 -> "20k", 0.2 -> "0.2", 1.5e6 -> "1.5M"."""
    for factor, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:g}{suffix}"
    return f"{value:g}"


def _log_ticks(axis) -> None:
    """Label a log axis at 1, 2 and 5 times each power of ten, compactly, never in 10^x form."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(compact_number))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _overlaps(box, boxes) -> bool:
    return any(box.overlaps(other) for other in boxes)


def place_labels(ax, xs: Sequence[float], ys: Sequence[float], texts: Sequence[str], fontsize: float = 7) -> list:
    """Annotate each point with its text, trying offsets below, above and further out until the
    text's box overlaps no label placed before it (nor leaves the figure); returns the annotations."""
    figure = ax.figure
    figure.draw_without_rendering()  # the layout engine places the axes first, so the boxes are final
    renderer = figure.canvas.get_renderer()
    offsets = [(4, -10), (4, 5), (-4, -10), (-4, 5), (4, -20), (4, 15), (4, -30), (4, 25), (4, -40), (4, 35)]
    placed, boxes = [], []
    for i in np.argsort(np.asarray(xs, dtype=float), kind="stable"):
        for dx, dy in offsets:
            note = ax.annotate(texts[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points",
                               fontsize=fontsize, ha="left" if dx > 0 else "right")
            box = note.get_window_extent(renderer).expanded(1.02, 1.1)
            if not _overlaps(box, boxes) and figure.bbox.contains(box.x0, box.y0) and \
                    figure.bbox.contains(box.x1, box.y1):
                break
            note.remove()
        else:
            note = ax.annotate(texts[i], (xs[i], ys[i]), xytext=offsets[0], textcoords="offset points",
                               fontsize=fontsize)
            box = note.get_window_extent(renderer)
        placed.append(note)
        boxes.append(box)
    return placed


def draw_pareto(ax, x: Sequence[float], metric: Sequence[float], labels: Sequence[str],
                methods: Sequence[str], front: Sequence[bool], xlabel: str = "bytes",
                ylabel: str = "accuracy", annotate: bool = True, logx: bool = True,
                max_series: int = MAX_SERIES, spread: Sequence[tuple[float, float] | None] | None = None) -> list:
    """Scatter of every point coloured by method (at most ``max_series`` colours: `group_series`
    folds the rest into "other"); the Pareto front drawn as a step line, its points ringed and
    labelled without overlaps (`place_labels`). ``front[i]`` is True for points on the front.

    ``spread[i]``: ``(low, high)`` of point i on the x axis, drawn as a horizontal error bar in its
    colour (latency: the quartiles of the timed runs around the median ``x[i]``); None: no bar."""
    x, metric = np.asarray(x, dtype=float), np.asarray(metric, dtype=float)
    artists = []
    methods = group_series(methods, max_series)
    kinds = list(dict.fromkeys(methods))
    cmap = matplotlib.colormaps["tab10"]
    for k, kind in enumerate(kinds):
        idx = [i for i, m in enumerate(methods) if m == kind]
        artists.append(ax.scatter(x[idx], metric[idx], color=cmap(k % 10), label=kind, zorder=3))
        bars = [i for i in idx if spread is not None and spread[i] is not None]
        if bars:
            low, high = np.asarray([spread[i] for i in bars], dtype=float).T
            artists.append(ax.errorbar(x[bars], metric[bars], xerr=[x[bars] - low, high - x[bars]], fmt="none",
                                       ecolor=cmap(k % 10), elinewidth=1, capsize=2, zorder=2))
    on = np.asarray(front, dtype=bool)
    if on.any():
        order = np.argsort(x[on])
        artists.append(ax.step(x[on][order], metric[on][order], where="post", color="black",
                               linewidth=1.2, label="Pareto front", zorder=2)[0])
        artists.append(ax.scatter(x[on], metric[on], s=140, facecolors="none", edgecolors="black", zorder=4))
    if logx:
        ax.set_xscale("log")
        _log_ticks(ax.xaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="x-small", loc="lower right")
    if annotate and on.any():
        idx = np.flatnonzero(on)
        artists += place_labels(ax, x[idx], metric[idx], [labels[i] for i in idx])
    return artists
