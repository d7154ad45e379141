"""Figures for choosing: sensitivity curves and heatmap, chosen ranks on spectra, Pareto charts.

Functions take plain arrays / lists and a matplotlib ``Axes`` and return the artists they drew
(no torch here), so widgets can update them in place.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


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
    ax.set_xticks(range(len(grid)), [f"{g:g}" for g in grid])
    ax.set_yticks(range(len(layers)), list(layers))
    ax.set_xlabel(xlabel)
    ax.set_title("metric drop")
    for i in range(drop.shape[0]):
        for j in range(drop.shape[1]):
            if np.isfinite(drop[i, j]):
                ax.text(j, i, f"{drop[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if drop[i, j] > 0.5 * np.nanmax(drop) else "black")
    ax.figure.colorbar(image, ax=ax, label="drop")
    return image


def draw_ranks_on_spectra(ax, spectra: dict[str, Sequence[float]],
                          ranks: dict[str, dict[str, int | None]]) -> list:
    """Each layer's normalized singular values (log scale) with a marker at the rank each
    allocator chose; ``ranks = {allocator: {layer: rank or None (dense)}}``."""
    artists = []
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, (name, s) in enumerate(spectra.items()):
        s = np.asarray(s, dtype=float)
        s = s / s[0] if len(s) and s[0] > 0 else s
        (line,) = ax.semilogy(np.arange(1, len(s) + 1), s, label=name)
        artists.append(line)
        for k, (allocator, chosen) in enumerate(ranks.items()):
            rank = chosen.get(name)
            if rank is not None and 1 <= rank <= len(s):
                artists.append(ax.plot(rank, s[rank - 1], markers[k % len(markers)], color=line.get_color(),
                                       markersize=8, markerfacecolor="none",
                                       label=allocator if i == 0 else None)[0])
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.set_title("chosen ranks on the spectra (markers: allocators; none = dense)")
    ax.legend(fontsize="small")
    return artists


def draw_pareto(ax, x: Sequence[float], metric: Sequence[float], labels: Sequence[str],
                methods: Sequence[str], front: Sequence[bool], xlabel: str = "bytes",
                ylabel: str = "accuracy", annotate: bool = True, logx: bool = True) -> list:
    """Scatter of every point coloured by method; the Pareto front drawn as a step line and
    its points ringed. ``front[i]`` is True for points on the front."""
    x, metric = np.asarray(x, dtype=float), np.asarray(metric, dtype=float)
    artists = []
    kinds = list(dict.fromkeys(methods))
    cmap = __import__("matplotlib").colormaps["tab20"]
    for k, kind in enumerate(kinds):
        idx = [i for i, m in enumerate(methods) if m == kind]
        artists.append(ax.scatter(x[idx], metric[idx], color=cmap(k % 20), label=kind, zorder=3))
    on = np.asarray(front, dtype=bool)
    if on.any():
        order = np.argsort(x[on])
        artists.append(ax.step(x[on][order], metric[on][order], where="post", color="black",
                               linewidth=1.2, label="Pareto front", zorder=2)[0])
        artists.append(ax.scatter(x[on], metric[on], s=140, facecolors="none", edgecolors="black", zorder=4))
    if annotate:
        for i in np.flatnonzero(on):
            artists.append(ax.annotate(labels[i], (x[i], metric[i]), fontsize=7, xytext=(4, -10),
                                       textcoords="offset points"))
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="x-small", loc="lower right")
    return artists
