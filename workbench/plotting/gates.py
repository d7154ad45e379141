"""Spectra of each gate's matrices of a GRU/LSTM, one curve per gate, with rank markers.

Input is plain data: ``{"ih": {gate: singular values (k,)}, "hh": {...}}`` (NumPy arrays or
lists); no torch here.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

TITLES = {"ih": "input weights W_i* (per gate)", "hh": "hidden weights W_h* (per gate)"}
BREAK_EVEN_STYLE = {"color": "C3", "linestyle": ":", "linewidth": 1.5}


def draw_gate_spectra(axes: Sequence, spectra: Mapping[str, Mapping[str, Sequence[float]]],
                      ranks: Mapping[str, int | None] | None = None) -> dict:
    """One panel per side ("ih", "hh"): each gate's singular values (log scale, normalised by the
    largest of that side) and a vertical marker at the current rank. Returns ``{side: marker}``."""
    markers = {}
    for ax, side in zip(axes, ("ih", "hh")):
        gates = spectra[side]
        top = max(float(np.max(s)) for s in gates.values()) or 1.0
        for gate, s in gates.items():
            s = np.asarray(s, dtype=float)
            ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s / top, 1e-12), marker=".", label=gate)
        ax.set_title(TITLES[side], fontsize=9)
        ax.set_xlabel("singular value index i (= rank)")
        ax.set_ylabel("sigma_i / sigma_max")
        ax.legend(fontsize=7)
        rank = (ranks or {}).get(side)
        markers[side] = ax.axvline(rank if rank else 0, color="k", linestyle="--", linewidth=1,
                                   visible=bool(rank))
    return markers


def update_rank_markers(markers: Mapping, ranks: Mapping[str, int | None]) -> None:
    """Move each side's marker to its rank (hidden when the side is dense)."""
    for side, marker in markers.items():
        rank = ranks.get(side)
        marker.set_visible(bool(rank))
        if rank:
            marker.set_xdata([rank, rank])


def draw_break_even(axes: Sequence, ranks: Mapping[str, int]) -> dict:
    """A dotted vertical line per side at its break-even rank (above it the factors hold more
    weights than the dense matrix), labelled in the legend. Returns ``{side: line}``."""
    lines = {}
    for ax, side in zip(axes, ("ih", "hh")):
        lines[side] = ax.axvline(ranks[side], label="break-even rank", **BREAK_EVEN_STYLE)
        ax.legend(fontsize=7)
    return lines


def update_break_even(lines: Mapping, ranks: Mapping[str, int]) -> None:
    """Move each side's break-even line to ``ranks[side]`` (per gate and stacked differ)."""
    for side, line in lines.items():
        line.set_xdata([ranks[side], ranks[side]])
