"""Heatmaps and small line charts for layer-by-type summaries (arrays in, artists out; no torch)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def draw_rank_heatmap(ax, values: np.ndarray, rows: Sequence[str], cols: Sequence[str],
                      title: str = "effective rank", cmap: str = "viridis",
                      vmin: float | None = None, vmax: float | None = None):
    """``values: (len(rows), len(cols))`` as an annotated heatmap (colour scale ``vmin..vmax``,
    default the values' range); returns the image artist."""
    values = np.asarray(values, dtype=float)
    image = ax.imshow(values, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(cols)), labels=list(cols), rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_title(title)
    return image


def update_rank_heatmap(image, values: np.ndarray, title: str | None = None) -> None:
    """Show new ``values`` (the shape drawn) on a `draw_rank_heatmap` image: colours (same scale),
    annotations and, if given, the title."""
    values = np.asarray(values, dtype=float)
    if values.shape != image.get_array().shape:
        raise ValueError(f"values of shape {values.shape} on a heatmap of shape {image.get_array().shape}")
    image.set_data(values)
    for text, v in zip(image.axes.texts, values.ravel()):
        text.set_text(f"{v:.0f}")
    if title is not None:
        image.axes.set_title(title)


def draw_fidelity_by_ratio(ax, ratios: Sequence[float], series: dict[str, Sequence[float]],
                           title: str = "", ylabel: str = "fidelity"):
    """One line per variant: ``series[name][i]`` at kept ratio ``ratios[i]``; returns the lines."""
    lines = [ax.plot(ratios, values, marker="o", label=name)[0] for name, values in series.items()]
    ax.set_xlabel("kept ratio of parameters")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    return lines
