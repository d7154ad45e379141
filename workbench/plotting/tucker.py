"""Spectra of a conv kernel's two channel unfoldings (Tucker-2's modes), with the chosen ranks.

Input is plain data: ``{"out": singular values (out,), "in": singular values (in,)}`` (NumPy
arrays or lists, descending) of the mode-0 and mode-1 unfoldings; no torch here. Each panel shows
``sigma_i / sigma_1`` (log scale), a dashed marker at the chosen rank, a dotted red line at the
break-even rank (hidden when every rank of that mode stays smaller than the dense kernel) and the
fraction of sigma^2 the rank keeps. `update_tucker_ranks` moves them; the three are the moving
artists to blit.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from workbench.plotting.spectra import energy_curve

MODES = ("out", "in")
TITLES = {"out": "output channels (mode 0)", "in": "input channels (mode 1)"}
BREAK_EVEN_STYLE = {"color": "C3", "linestyle": ":", "linewidth": 1.5}


def draw_tucker_spectra(axes: Sequence, spectra: Mapping[str, Sequence[float]], ranks: Mapping[str, int],
                        break_even: Mapping[str, int]) -> dict:
    """One panel per mode ("out", "in") on ``axes`` (two). ``ranks`` / ``break_even``: ``{mode:
    rank}``. Returns ``{mode: {"rank", "break_even", "energy", "curve"}}``: the marker line, the
    break-even line, the energy text and the energy curve ``(size,)`` (fraction of sigma^2 kept
    at ranks 1..size), for `update_tucker_ranks`."""
    artists = {}
    for ax, mode in zip(axes, MODES):
        s = np.asarray(spectra[mode], dtype=float)
        top = float(s[0]) if len(s) and s[0] > 0 else 1.0
        index = np.arange(1, len(s) + 1)
        ax.semilogy(index, np.maximum(s / top, 1e-12), marker=".", color="C0")
        ax.set_xlim(0, len(s) + 1)
        ax.set_title(TITLES[mode], fontsize=9)
        ax.set_xlabel(f"rank_{mode} (singular value index)", fontsize=8)
        ax.set_ylabel("sigma_i / sigma_1" if mode == "out" else "", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        artists[mode] = {
            "rank": ax.axvline(1, color="k", linestyle="--", linewidth=1, label="rank chosen"),
            "break_even": ax.axvline(1, label="break-even rank", **BREAK_EVEN_STYLE),
            "energy": ax.text(0.97, 0.95, "", transform=ax.transAxes, ha="right", va="top", fontsize=8,
                              bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8}),
            "curve": energy_curve(s),
        }
        ax.legend(fontsize=7, loc="lower left")
    update_tucker_ranks(artists, ranks, break_even)
    return artists


def update_tucker_ranks(artists: Mapping, ranks: Mapping[str, int], break_even: Mapping[str, int]) -> list:
    """Move each mode's rank marker to ``ranks[mode]`` and its break-even line to
    ``break_even[mode]`` (hidden when it is at or beyond the mode's size), and write the energy
    kept. Returns the artists changed (to blit)."""
    moved = []
    for mode, parts in artists.items():
        size, rank, limit = len(parts["curve"]), ranks[mode], break_even[mode]
        parts["rank"].set_xdata([rank, rank])
        parts["break_even"].set_xdata([limit, limit])
        parts["break_even"].set_visible(limit < size)
        bound = f"break-even rank {limit}" if limit < size else "no break-even: every rank is smaller"
        parts["energy"].set_text(f"rank {rank} of {size}: {parts['curve'][rank - 1]:.1%} of sigma^2 kept\n{bound}")
        moved += [parts["rank"], parts["break_even"], parts["energy"]]
    return moved
