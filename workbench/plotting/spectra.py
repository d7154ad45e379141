"""Singular-value spectra and energy curves of a model's layers (arrays in, figure and artists out).

The seaborn look is applied only inside `spectra_figure` (``seaborn.axes_style`` /
``plotting_context`` contexts): importing or calling this module changes no global style.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D


@dataclass
class SpectraArtists:
    """Per layer: the spectrum and energy lines, and a vertical rank marker on each axes."""

    figure: Figure
    names: list[str]
    spectrum_axes: list[Axes]
    energy_axes: list[Axes]
    rank_markers: dict[str, tuple[Line2D, Line2D]]


def energy_curve(singular_values: np.ndarray) -> np.ndarray:
    """Cumulative fraction of sigma^2 kept at ranks 1..k: ``(k,)`` in [0, 1]."""
    sq = np.asarray(singular_values, dtype=np.float64) ** 2
    total = sq.sum()
    return np.ones_like(sq) if total == 0 else np.cumsum(sq) / total


def spectra_figure(spectra: Mapping[str, np.ndarray], ranks: Mapping[str, int] | None = None,
                   style: str = "whitegrid", context: str = "notebook",
                   panel_size: tuple[float, float] = (3.2, 2.4)) -> SpectraArtists:
    """Two rows of panels: normalized singular values ``sigma_i / sigma_1`` (log scale) and the
    energy curve, one column per layer.

    ``spectra``: ``{layer name: singular values (k,) descending}``; ``ranks``: optional
    ``{layer: rank}`` drawn as vertical markers (move them with `update_rank_markers`).
    """
    import seaborn as sns  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    names = list(spectra)
    ranks = dict(ranks or {})
    with sns.axes_style(style), sns.plotting_context(context, font_scale=0.8):
        figure = Figure(figsize=(panel_size[0] * max(1, len(names)), panel_size[1] * 2), layout="constrained")
        axes = np.atleast_2d(figure.subplots(2, max(1, len(names)), squeeze=False))
        palette = sns.color_palette("deep", max(1, len(names)))
        markers = {}
        for column, name in enumerate(names):
            s = np.asarray(spectra[name], dtype=np.float64)
            ranks_axis = np.arange(1, len(s) + 1)
            top, bottom = axes[0, column], axes[1, column]
            top.semilogy(ranks_axis, s / s[0] if s[0] > 0 else s, color=palette[column])
            top.set_title(f"{name} ({len(s)} values)")
            top.set_ylabel(r"$\sigma_i / \sigma_1$" if column == 0 else "")
            bottom.plot(ranks_axis, energy_curve(s), color=palette[column])
            bottom.set_ylim(0, 1.02)
            bottom.set_xlabel("rank")
            bottom.set_ylabel("energy kept" if column == 0 else "")
            rank = ranks.get(name, len(s))
            markers[name] = (top.axvline(rank, color="0.3", lw=1, ls="--"),
                             bottom.axvline(rank, color="0.3", lw=1, ls="--"))
    return SpectraArtists(figure, names, list(axes[0]), list(axes[1]), markers)


def update_rank_markers(artists: SpectraArtists, ranks: Mapping[str, int]) -> None:
    """Move each named layer's rank markers to ``ranks[layer]`` (no new artists)."""
    for name, rank in ranks.items():
        for line in artists.rank_markers.get(name, ()):
            line.set_xdata([rank, rank])


def spectra_table(spectra: Sequence) -> dict[str, np.ndarray]:
    """``{name: singular values}`` from objects with ``.name`` and ``.singular_values`` (arrays or tensors)."""
    return {s.name: np.asarray(s.singular_values, dtype=np.float64) for s in spectra}
