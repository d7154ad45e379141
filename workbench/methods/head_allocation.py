"""Global allocation of head / FFN pruning: which blocks keep how many units (pure functions).

With ``global_ranking`` the kept fraction ``ratio`` holds for the Linear parameters of all the
chosen transformer blocks together, not for each block: every attention unit (a head; a k/v
group under GQA) and every FFN hidden unit (or chunk of ``round_to`` of them) of every block is
ranked by its importance per parameter it costs, ``score / cost``, and the best are kept until the
parameter budget is spent. Each block first keeps its floor (its best ``head_floor`` attention units
and ``ffn_floor`` FFN units), so no block is emptied. Within a block, units stay ranked by score, so
a block always keeps its best units (the kept counts are all that is decided here).

Scores (output energy into the residual stream, `head_pruning.unit_scores`) grow with depth, so by
default (``scale="block"``) each block's scores are divided by their sum (heads and FFN together)
before ranking: a unit is then judged by its share of its own block's output; ``scale="raw"``
compares the energies as measured.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from workbench.errors import WorkbenchError

SCALES = ("block", "raw")


def allocate(head_scores: Sequence[torch.Tensor], ffn_scores: Sequence[torch.Tensor],
             costs: Sequence[tuple[int, int]], budget: float, head_floors: Sequence[int],
             ffn_floors: Sequence[int], round_to: int | None = None, scale: str = "block") -> list[tuple[int, int]]:
    """``[(attention units kept, FFN units kept)]`` per block, the greedy best by score per parameter.

    Parameters
    ----------
    head_scores, ffn_scores : per block, ``(groups,)`` and ``(width,)`` unit importances (>= 0).
    costs : per block, ``(params per attention unit, params per FFN unit)``.
    budget : parameters the kept units may hold in all (fixed biases excluded); the result holds
        at most ``budget`` and, unless every unit is kept, less than one FFN chunk below it.
    head_floors, ffn_floors : units each block keeps whatever their scores (at least 1 each).
    round_to : FFN units are taken in chunks of this many (the floor rounded up to it).
    scale : "block" (scores divided by their block's total) or "raw".
    """
    if scale not in SCALES:
        raise WorkbenchError(f"scale={scale!r} is not one of {', '.join(SCALES)} for global head / FFN allocation")
    step = round_to or 1
    kept, candidates = [], []
    for b, (hs, fs, (head_cost, ffn_cost), hf, ff) in enumerate(zip(head_scores, ffn_scores, costs, head_floors,
                                                                      ffn_floors)):
        groups, width = len(hs), len(fs)
        hf = min(max(int(hf), 1), groups)
        ff = min(max(step * math.ceil(max(int(ff), 1) / step), 1), width)
        kept.append([hf, ff])
        norm = float(hs.double().sum() + fs.double().sum()) if scale == "block" else 1.0
        norm = norm if norm > 0 else 1.0
        hs = torch.sort(hs.double(), descending=True, stable=True).values / norm
        fs = torch.sort(fs.double(), descending=True, stable=True).values / norm
        for i in range(hf, groups):
            candidates.append((float(hs[i]) / head_cost, b, 0, i, head_cost, 1))
        for i in range(ff, width, step):
            n = min(step, width - i)
            candidates.append((float(fs[i:i + n].sum()) / (n * ffn_cost), b, 1, i, n * ffn_cost, n))
    used = sum(h * c[0] + f * c[1] for (h, f), c in zip(kept, costs))
    if used > budget:
        raise WorkbenchError(f"the per-block floors ({sum(h for h, _ in kept)} attention units, "
                             f"{sum(f for _, f in kept)} FFN units) hold {used} parameters, more than the "
                             f"{budget:.0f} the ratio leaves for all blocks; raise ratio or lower min_heads / max_ratio")
    closed = set()  # (block, kind) whose next unit did not fit: later ones of it are skipped (prefix kept)
    for _, b, kind, _, cost, n in sorted(candidates, key=lambda c: (-c[0], c[1], c[2], c[3])):
        if (b, kind) in closed:
            continue
        if used + cost > budget:
            closed.add((b, kind))
            continue
        used += cost
        kept[b][kind] += n
    return [(h, f) for h, f in kept]
