"""Accuracy-vs-size chart: a reference curve, the trail of visited settings and the current point.

`draw_tradeoff` creates the artists once; `update_tradeoff` only calls ``set_data`` on them, so a
slider move never rebuilds the figure. The view limits stay fixed (so a caller may blit the moving
artists over a saved background) and grow only when a point falls outside them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.text import Text


@dataclass
class TradeoffArtists:
    ax: Axes
    reference: Line2D   # e.g. the same kept ratio for every layer
    original: Line2D    # the uncompressed model
    trail: Line2D       # settings visited so far
    current: Line2D     # the setting shown now
    label: Text

    @property
    def moving(self) -> tuple:
        """The artists `update_tradeoff` changes (to blit over a background without them)."""
        return (self.trail, self.current, self.label)


def draw_tradeoff(ax: Axes, reference_size: Sequence[float], reference_metric: Sequence[float],
                  original: tuple[float, float], size_label: str = "size (KiB)",
                  metric_label: str = "accuracy", reference_label: str = "same ratio every layer") -> TradeoffArtists:
    """Draw the chart on ``ax``. Sizes and metrics are 1-D arrays of equal length (any units)."""
    reference, = ax.plot(reference_size, reference_metric, "-", color="0.65", marker=".", label=reference_label)
    original_point, = ax.plot([original[0]], [original[1]], "s", color="0.2", label="original")
    trail, = ax.plot([], [], "o", color="C0", alpha=0.35, ms=4, label="visited")
    current, = ax.plot([original[0]], [original[1]], "o", color="C3", ms=9, label="current")
    label = ax.text(0.02, 0.04, "", transform=ax.transAxes, fontsize="small")
    ax.set_xlabel(size_label)
    ax.set_ylabel(metric_label)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    xs = [*reference_size, original[0]]
    ax.set_xlim(0, max(xs) * 1.1 if len(xs) else 1)
    ax.set_ylim(0, 1.02 if max([*reference_metric, original[1]]) <= 1 else None)
    return TradeoffArtists(ax, reference, original_point, trail, current, label)


def update_tradeoff(artists: TradeoffArtists, current: tuple[float, float],
                    trail: tuple[Sequence[float], Sequence[float]] | None = None, text: str | None = None) -> bool:
    """Move the current point (and the trail) with ``set_data``.

    Returns True when the view limits had to grow to show the point (the whole figure must then
    be redrawn; otherwise only `TradeoffArtists.moving` changed).
    """
    artists.current.set_data([current[0]], [current[1]])
    if trail is not None:
        artists.trail.set_data(np.asarray(trail[0]), np.asarray(trail[1]))
    if text is not None:
        artists.label.set_text(text)
    x0, x1 = artists.ax.get_xlim()
    y0, y1 = artists.ax.get_ylim()
    x, y = current
    if x0 <= x <= x1 and y0 <= y <= y1:
        return False
    artists.ax.set_xlim(min(x0, x), max(x1, x * 1.1))
    artists.ax.set_ylim(min(y0, y), max(y1, y * 1.02))
    return True
