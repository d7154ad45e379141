"""Figures of the structured-pruning explorer (arrays in, artists out; no torch): each ``draw_*``
builds artists once, each ``update_*`` only changes their data.

* kept units per group: a grey bar for the group's full width, a blue bar for what is kept;
* measured speed-up at batch 1 and at a chosen batch, beside what the FLOP ratio would promise
  (``1 / flop_ratio``), with the quartile range of the measurement as error bars.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes


@dataclass
class KeptArtists:
    kept: list
    labels: list
    ax: Axes


def draw_kept_units(ax: Axes, names: Sequence[str], full: Sequence[int], unit: str = "channels") -> KeptArtists:
    """One horizontal bar per group (first group on top): grey = ``full`` width, blue = kept (the
    x label says so: no legend over the bars)."""
    y = np.arange(len(names))[::-1]
    full = np.asarray(full, dtype=float)
    ax.barh(y, full, color="0.85")
    kept = list(ax.barh(y, full, color="C0"))
    labels = [ax.text(w, yi, "", va="center", ha="left", fontsize="small") for w, yi in zip(full, y)]
    ax.set_yticks(y, names, fontsize="small")
    ax.set_xlim(0, float(full.max()) * 1.3)
    ax.set_xlabel(f"{unit} kept (blue) of the original (grey)")
    ax.set_title(" ", fontsize="medium")  # room for update_kept_units' title
    return KeptArtists(kept, labels, ax)


def update_kept_units(artists: KeptArtists, kept: Sequence[int], full: Sequence[int], title: str) -> None:
    """Set the blue bars to ``kept`` (one per group, in the order drawn) and their ``k / C`` labels."""
    for bar, label, k, c in zip(artists.kept, artists.labels, kept, full):
        bar.set_width(k)
        label.set_text(f" {k}/{c}")
    artists.ax.set_title(title, fontsize="medium")


@dataclass
class SpeedArtists:
    measured: list
    promised: list
    errors: object
    labels: list
    ax: Axes


def draw_speedups(ax: Axes) -> SpeedArtists:
    """Two pairs of bars (batch 1, chosen batch): measured speed-up (blue) and ``1 / FLOP ratio`` (grey),
    a dashed line at 1 (no change); heights set by `update_speedups`."""
    x = np.arange(2)
    measured = list(ax.bar(x - 0.2, np.ones(2), width=0.4, color="C0", label="measured"))
    promised = list(ax.bar(x + 0.2, np.ones(2), width=0.4, color="0.6", label="1 / FLOP ratio"))
    errors = ax.errorbar(x - 0.2, np.ones(2), yerr=np.zeros((2, 2)), fmt="none", ecolor="k", capsize=5)
    labels = [ax.text(i - 0.2, 1, "", ha="center", va="bottom", fontsize="small") for i in x]
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, ["batch 1", "batch"])
    ax.set_ylabel("speed-up over the original (x)")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(" ", fontsize="medium")
    return SpeedArtists(measured, promised, errors, labels, ax)


def update_speedups(artists: SpeedArtists, batches: Sequence[int], measured: Sequence[float],
                    low: Sequence[float], high: Sequence[float], flop_ratio: float, title: str) -> None:
    """``measured``: speed-up (original median / pruned median) per batch; ``low`` / ``high``: its range
    from the quartiles (original q1 / pruned q3, original q3 / pruned q1); ``flop_ratio``: pruned FLOPs
    over the original's. The y axis follows the medians (a noisy range may run off it)."""
    measured, low, high = (np.asarray(v, dtype=float) for v in (measured, low, high))
    promised = 1.0 / flop_ratio if flop_ratio > 0 else 0.0
    for bar, label, value in zip(artists.measured, artists.labels, measured):
        bar.set_height(value)
        label.set_position((bar.get_x() + bar.get_width() / 2, value))
        label.set_text(f"{value:.2f}x")
    for bar in artists.promised:
        bar.set_height(promised)
    artists.errors.remove()
    x = [bar.get_x() + bar.get_width() / 2 for bar in artists.measured]
    artists.errors = artists.ax.errorbar(x, measured, yerr=np.vstack([np.clip(measured - low, 0, None),
                                                                      np.clip(high - measured, 0, None)]),
                                         fmt="none", ecolor="k", capsize=5)
    artists.ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    artists.ax.set_ylim(0, max(float(measured.max()), promised, 1.0) * 1.6)
    artists.ax.set_title(title, fontsize="medium")
