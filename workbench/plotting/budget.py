"""The byte-budget chart: each family's front and the joint allocator's on one size-vs-metric chart.

Arrays in, artists out (no torch here): `draw_budget_fronts` draws once; `update_budget_pick`
moves the marker of the current pick (a budget slider) with ``set_data`` only.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def draw_budget_fronts(ax, fronts: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                       baseline: float | None = None, joint: str = "joint",
                       xlabel: str = "fraction of the original bytes", ylabel: str = "accuracy",
                       with_pick: bool = True) -> dict:
    """One line per family ``{label: (x, y)}`` (x: fraction of the budget measure used, y: metric);
    the ``joint`` label drawn on top, thick and black; a dashed line at ``baseline`` (the original).

    Returns ``{"lines": {label: Line2D}, "baseline": Line2D or None, "pick": Line2D}``; ``pick``
    starts empty (see `update_budget_pick`); None when not ``with_pick`` (a static chart).
    """
    lines = {}
    for label, (x, y) in fronts.items():
        if label == joint:
            continue
        lines[label] = ax.plot(x, y, marker="o", markersize=4, linewidth=1, alpha=0.8, label=label)[0]
    if joint in fronts:
        x, y = fronts[joint]
        lines[joint] = ax.plot(x, y, marker="*", markersize=10, linewidth=2.5, color="black", label=joint,
                               zorder=5)[0]
    line = None
    if baseline is not None:
        line = ax.axhline(baseline, color="0.4", linestyle="--", linewidth=1, label="original")
    pick = ax.plot([], [], marker="D", markersize=9, linestyle="none", color="crimson", label="current pick",
                   zorder=6)[0] if with_pick else None
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("one budget, every family: which wins where")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return {"lines": lines, "baseline": line, "pick": pick}


def update_budget_pick(artists: dict, x: float | None, y: float | None) -> bool:
    """Move the pick marker to ``(x, y)`` (None: hide it). Returns False: no full redraw needed."""
    artists["pick"].set_data([] if x is None else [x], [] if y is None else [y])
    return False
