"""What a recipe chooses for: each matrix layer alone, and each tied group as one unit.

A tied group (`workbench.inventory.tied_groups`: ``dec.weight = enc.weight``) is compressed as one
or left dense (the tie rule of `workbench.compress.tied_choices`), so a recipe picks ONE choice
for its shared matrix and gives it to every member. A group the matrix methods cannot take
(an embedding tied to an LM head), or that this recipe cannot serve, goes to the plan's
``left_dense`` with the reason instead of being skipped silently.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from workbench.errors import WorkbenchError
from workbench.inventory import LayerInfo, offered_units, tied_groups

Units = dict[str, tuple[tuple[str, ...], LayerInfo]]


def unit_table(model: nn.Module, refuse: Callable[[LayerInfo], str | None] | None = None,
               kinds: tuple[str, ...] | None = None) -> tuple[Units, dict[tuple[str, ...], str]]:
    """``(units, left_dense)`` of ``model`` for one recipe.

    ``units``: ``{key: (names, info)}`` in module order, keyed by the first name (a layer alone:
    ``(name,)``); ``info.shape`` is the (shared) ``(out, in)`` matrix, ``info.params`` counts a
    shared tensor once. ``kinds``: keep units of these kinds only ("linear", "conv"); a tied group
    of another kind goes to ``left_dense``. ``refuse(info) -> reason | None``: why this recipe
    cannot serve a tied group (None: it can). ``left_dense``: ``{members: reason}``.
    """
    dense = {group.names: group.reason for group in tied_groups(model) if group.info is None}
    units: Units = {}
    for names, info in offered_units(model):
        tied = len(names) > 1
        if kinds is not None and info.kind not in kinds:
            if tied:
                dense[names] = (f"tied group {' + '.join(names)} stays dense: this method takes "
                                f"{' and '.join(kinds)} layers, and these are {info.kind} layers")
            continue
        reason = refuse(info) if tied and refuse is not None else None
        if reason is not None:
            dense[names] = f"tied group {' + '.join(names)} stays dense: {reason}"
            continue
        units[names[0]] = (names, info)
    return units, dense


def unit_of(units: Units, dense: dict[tuple[str, ...], str], name: str) -> str | None:
    """The key in ``units`` of the unit holding layer ``name`` (a tied member names its group);
    None when no unit holds it. Raises `WorkbenchError` with the reason when ``name`` is in a
    tied group left dense."""
    for key, (names, _) in units.items():
        if name in names:
            return key
    for names, reason in dense.items():
        if name in names:
            raise WorkbenchError(f"layer {name!r} cannot be compressed by this recipe: {reason}")
    return None


def unit_names(units: Units) -> str:
    """Every layer name of ``units``, for messages (``"fc1, enc, dec, fc2"``)."""
    return ", ".join(name for names, _ in units.values() for name in names)
