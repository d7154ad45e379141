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
from matplotlib.ticker import NullFormatter

#: default cut of the spectrum panels: values below 1e-6 of the largest are round-off of a zero
#: direction (e.g. the all-zero input columns of an image's blank border pixels), not information
SPECTRUM_FLOOR = 1e-6


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
                   panel_size: tuple[float, float] = (3.2, 2.4), floor: float | None = SPECTRUM_FLOOR,
                   break_even: Mapping[str, float] | None = None) -> SpectraArtists:
    """Two rows of panels: normalized singular values ``sigma_i / sigma_1`` (log scale) and the
    energy curve, one column per layer.

    ``spectra``: ``{layer name: singular values (k,) descending}``; ``ranks``: optional
    ``{layer: rank}`` drawn as vertical markers (move them with `update_rank_markers`).
    ``floor``: the spectrum panels show ``sigma_i / sigma_1 >= floor`` only (the title counts the
    values cut; None: no cut); the energy curves always use every value. ``break_even``: optional
    ``{layer: rank}`` drawn as a dotted red line: the break-even rank (`workbench.kernels.svd.breakeven_rank`,
    the largest rank whose two factors hold fewer weights than the dense layer).
    """
    import seaborn as sns  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    names = list(spectra)
    ranks = dict(ranks or {})
    break_even = dict(break_even or {})
    with sns.axes_style(style), sns.plotting_context(context, font_scale=0.8):
        figure = Figure(figsize=(panel_size[0] * max(1, len(names)), panel_size[1] * 2), layout="constrained")
        axes = np.atleast_2d(figure.subplots(2, max(1, len(names)), squeeze=False))
        palette = sns.color_palette("deep", max(1, len(names)))
        markers = {}
        for column, name in enumerate(names):
            s = np.asarray(spectra[name], dtype=np.float64)
            ranks_axis = np.arange(1, len(s) + 1)
            top, bottom = axes[0, column], axes[1, column]
            relative = s / s[0] if s[0] > 0 else s
            shown = relative >= floor if floor else np.ones(len(s), dtype=bool)
            top.semilogy(ranks_axis[shown], relative[shown], color=palette[column])
            cut = int((~shown).sum())
            lowest = float(relative[shown].min()) if shown.any() else 1.0
            if lowest < 0.1:  # several decades: label the decades only (no crowded minor labels)
                top.yaxis.set_minor_formatter(NullFormatter())
            if floor:
                top.set_ylim(bottom=max(floor, lowest) / 2, top=1.5)
            top.set_xlim(0, len(s) + 1)
            top.set_title(f"{name} ({len(s)} values" + (f"; {cut} < {floor:g} not shown)" if cut else ")"))
            top.set_ylabel(r"$\sigma_i / \sigma_1$ (log)" if column == 0 else "")
            bottom.plot(ranks_axis, energy_curve(s), color=palette[column])
            bottom.set_ylim(0, 1.02)
            bottom.set_xlim(0, len(s) + 1)
            bottom.set_xlabel("rank r")
            bottom.set_ylabel("energy kept (fraction)" if column == 0 else "")
            rank = ranks.get(name, len(s))
            shown_rank = name in ranks  # without a rank the markers wait, hidden, for `update_rank_markers`
            markers[name] = (top.axvline(rank, color="0.3", lw=1, ls="--", label="rank chosen", visible=shown_rank),
                             bottom.axvline(rank, color="0.3", lw=1, ls="--", visible=shown_rank))
            if name in break_even:
                top.axvline(break_even[name], color="C3", lw=1.2, ls=":", label="break-even rank")
                bottom.axvline(break_even[name], color="C3", lw=1.2, ls=":")
        handles = {}
        for ax in axes[0]:
            for line in ax.get_lines():
                if line.get_visible() and not line.get_label().startswith("_"):
                    handles.setdefault(line.get_label(), line)
        if handles:
            axes[0, 0].legend(list(handles.values()), list(handles), loc="lower left", fontsize="small")
    return SpectraArtists(figure, names, list(axes[0]), list(axes[1]), markers)


def update_rank_markers(artists: SpectraArtists, ranks: Mapping[str, int]) -> None:
    """Move each named layer's rank markers to ``ranks[layer]`` and show them (no new artists)."""
    for name, rank in ranks.items():
        for line in artists.rank_markers.get(name, ()):
            line.set_xdata([rank, rank])
            line.set_visible(True)


def spectra_table(spectra: Sequence) -> dict[str, np.ndarray]:
    """``{name: singular values}`` from objects with ``.name`` and ``.singular_values`` (arrays or tensors)."""
    return {s.name: np.asarray(s.singular_values, dtype=np.float64) for s in spectra}
