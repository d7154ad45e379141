"""Head and FFN-width knobs for the `StructuredExplorer` (``prune_heads``, issue 18).

`head_knobs` makes two knobs per BERT / GPT-2 / Llama block of a model
(`workbench.methods.head_pruning.find_blocks`): ``"<block>.heads"`` (kind "heads": its attention
units, i.e. query heads, or k/v heads with the query heads sharing them under grouped-query
attention) and ``"<block>.ffn"`` (kind "ffn": its FFN hidden units), each ranked once, most
important first (`unit_scores`: output energy on calibration inputs, or weight norms without
them). Importing this module registers the ``prune_heads`` step for such knobs
(`register_group_step`): the knobs below full become one step, whose per-block
``heads_removed`` / ``ffn_removed`` lists hold original indices (a block whose other knob is full
removes nothing there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.methods.head_pruning import find_blocks, unit_scores
from workbench.plan import LayerPlan
from workbench.widgets.structured import GroupKnob, register_group_step

METHOD = "prune_heads"
_SUFFIX = {"heads": ".heads", "ffn": ".ffn"}


@dataclass(frozen=True)
class HeadKnob(GroupKnob):
    """A `GroupKnob` of a block's attention units; ``group_size``: query heads per unit (grouped-query
    attention shares one k/v head among them; 1 for multi-head attention)."""

    group_size: int = 1


def _ranked(scores: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.argsort(scores, descending=True, stable=True).tolist())


def head_knobs(model: nn.Module, inputs: Any = None) -> list[GroupKnob]:
    """``[heads knob, FFN knob]`` per block of ``model`` (not modified), in module order.

    ``inputs``: calibration inputs ``(n, ...)`` for output-energy ranking; ``None``: weight norms.
    A heads knob's ``channels`` are the block's attention units (k/v heads under grouped-query
    attention); an FFN knob's, its hidden units. Raises `WorkbenchError` for a model without such blocks.
    """
    blocks = find_blocks(model)
    if not blocks:
        raise WorkbenchError("this model has no BERT / GPT-2 / Llama block whose heads and FFN width can be pruned")
    knobs = []
    for b, (heads, ffn) in zip(blocks, unit_scores(model, blocks, inputs)):
        knobs.append(HeadKnob(b.name + _SUFFIX["heads"], b.groups, "heads", _ranked(heads), (*b.qkv, b.out), METHOD,
                              b.heads // b.groups))
        knobs.append(GroupKnob(b.name + _SUFFIX["ffn"], b.width, "ffn", _ranked(ffn), (*b.ffn_in, b.ffn_out), METHOD))
    return knobs


def _block_of(knob: GroupKnob) -> str:
    suffix = _SUFFIX[knob.kind] if knob.kind in _SUFFIX else None
    if suffix is None or not knob.name.endswith(suffix):
        raise WorkbenchError(f"knob {knob.name!r} (kind {knob.kind!r}) is not a prune_heads knob: its name must be "
                             "'<block>.heads' (kind 'heads') or '<block>.ffn' (kind 'ffn'), see head_knobs")
    return knob.name[:-len(suffix)]


def _heads_step(entries, context: Mapping[str, Any]) -> LayerPlan:
    """One ``prune_heads`` step from ``[(knob, removed units)]``; a heads knob's units are expanded to
    query heads (``units_per_group``: its `HeadKnob.group_size` query heads per unit)."""
    rows: dict[str, dict] = {}
    for knob, removed in entries:
        row = rows.setdefault(_block_of(knob), {"heads": (), "ffn": (), "per": 1})
        if knob.kind == "heads":
            per = getattr(knob, "group_size", 1)
            row["heads"], row["per"] = tuple(u * per + i for u in removed for i in range(per)), per
        else:
            row["ffn"] = tuple(removed)
    names = tuple(rows)
    return LayerPlan(METHOD, {"blocks": names, "heads_removed": tuple(rows[n]["heads"] for n in names),
                              "ffn_removed": tuple(rows[n]["ffn"] for n in names),
                              "units_per_group": tuple(rows[n]["per"] for n in names), "importance": "explorer"})


def _read_heads(step: LayerPlan) -> dict[str, tuple[int, ...]]:
    names, heads, ffn = step.get("blocks") or (), step.get("heads_removed") or (), step.get("ffn_removed") or ()
    per = step.get("units_per_group") or (1,) * len(names)
    if not len(names) == len(heads) == len(ffn) == len(per):
        raise WorkbenchError(f"the prune_heads step has {len(names)} blocks but {len(heads)} 'heads_removed', "
                             f"{len(ffn)} 'ffn_removed' and {len(per)} 'units_per_group' lists")
    found = {}
    for name, h, f, p in zip(names, heads, ffn, per):
        if h:
            found[name + _SUFFIX["heads"]] = tuple(sorted({int(i) // p for i in h}))
        if f:
            found[name + _SUFFIX["ffn"]] = tuple(f)
    return found


register_group_step(METHOD, _heads_step, _read_heads)
