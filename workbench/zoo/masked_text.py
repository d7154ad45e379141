"""Padded texts as one tensor: ids and attention mask ``(n, 2, T)`` through a copy of the model.

The workbench calls ``model(inputs)`` with one tensor per batch. For texts of different lengths
(`workbench.zoo.hf.text_inputs`), that tensor holds the ids (``[:, 0]``, padded on the right) and
the attention mask (``[:, 1]``, 1 at real tokens), and `with_attention_mask` gives a copy of the
user's model whose hooks

* before the forward: trim the batch to its longest text (columns that are padding in every row
  are dropped) and call the model with ``input_ids=`` and ``attention_mask=``;
* after the forward: give every sequence output (a 3-D tensor ``(n, t, ...)``: hidden states,
  logits) back its full width ``T``, with zeros at every padding position.

So a batch costs the tokens of its longest text, not of the longest text overall, and the outputs
at padding are zeros whatever the batch (the fidelity metric compares real tokens only; a causal
LM's targets have `IGNORE_INDEX` there, `next_token_targets`). The engine groups texts of similar
length into batches (`length_buckets`, the model's ``evaluation_batches``). Attention maps (4-D)
and other outputs keep the trimmed width.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError

IGNORE_INDEX = -100  # a target at padding: `torch.nn.functional.cross_entropy` skips it
BUCKET_WASTE = 0.2   # a text joins a batch while its length is >= (1 - BUCKET_WASTE) x the batch's longest
BUCKET_ROWS = 256    # most texts in one batch


def check_takes_attention_mask(model: nn.Module) -> None:
    """Refuse a model whose forward has no ``input_ids`` and ``attention_mask`` parameters (or ``**kwargs``)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    missing = [name for name in ("input_ids", "attention_mask") if name not in parameters]
    if missing and not takes_any:
        raise WorkbenchError(f"texts= pads the texts and passes an attention mask, but {type(model).__name__}.forward "
                             f"takes no {' or '.join(missing)}; give eval_data= (token ids) instead")


def is_ids_and_mask(value: Any) -> bool:
    """Whether ``value`` is one ``(n, 2, T)`` integer tensor of ids and mask."""
    return (isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[1] == 2
            and not value.is_floating_point() and value.dtype != torch.bool)


class MaskedTextCall:
    """The pair of hooks of `with_attention_mask` (see the module doc). ``last``: the full width
    ``T`` and the trimmed mask ``(n, t)`` of the call in progress (a model's forward is not
    re-entered, and a call stopped early, as stage 0 of `workbench.auto_stages` does, leaves only
    this one slot behind)."""

    def __init__(self):
        self.last: tuple[int, torch.Tensor] | None = None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if len(args) != 1 or kwargs or not is_ids_and_mask(args[0]):
            self.last = None
            return None
        ids, mask = args[0][:, 0], args[0][:, 1]
        width = max(int(mask.sum(1).max()), 1) if len(mask) else ids.shape[1]
        mask = mask[:, :width]
        self.last = (ids.shape[1], mask)
        return (), {"input_ids": ids[:, :width], "attention_mask": mask}

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.last is None:
            return None
        full, mask = self.last
        self.last = None
        return _widened(output, mask, full)


def _widened(value: Any, mask: torch.Tensor, full: int) -> Any:
    """``value`` with each ``(n, t, ...)`` tensor zeroed at padding and padded to ``full`` positions."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 3 or tuple(value.shape[:2]) != tuple(mask.shape):
            return value
        kept = value * mask.unsqueeze(-1).to(value.dtype)
        return F.pad(kept, (0, 0, 0, full - mask.shape[1]))
    if isinstance(value, Mapping):  # dict, transformers' ModelOutput (set in place: it keeps its class)
        for key in list(value.keys()):
            value[key] = _widened(value[key], mask, full)
        return value
    if isinstance(value, (tuple, list)) and type(value) in (tuple, list):
        return type(value)(_widened(item, mask, full) for item in value)
    return value


def length_buckets(inputs: torch.Tensor) -> list[torch.Tensor]:
    """Index groups of ``inputs: (n, 2, T)`` for the engine's batches: longest texts first, a text
    joining the current group while its length is at least ``(1 - BUCKET_WASTE)`` of the group's
    longest (and the group has fewer than ``BUCKET_ROWS`` texts)."""
    lengths = inputs[:, 1].sum(1)
    groups: list[list[int]] = []
    longest = 0
    for index in lengths.argsort(descending=True, stable=True).tolist():
        length = int(lengths[index])
        if groups and length >= (1 - BUCKET_WASTE) * longest and len(groups[-1]) < BUCKET_ROWS:
            groups[-1].append(index)
        else:
            groups.append([index])
            longest = length
    return [torch.tensor(group, dtype=torch.long) for group in groups]


def with_attention_mask(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that takes ids and mask as one ``(n, 2, T)`` tensor (see the
    module doc), grouping texts by length for the engine; the copy keeps ``model``'s mode, and
    ``model`` itself is not touched. Called with anything else, the copy runs as ``model``."""
    masked = copy.deepcopy(model)
    call = MaskedTextCall()
    masked.register_forward_pre_hook(call.before, with_kwargs=True)
    masked.register_forward_hook(call.after, with_kwargs=True)
    masked.evaluation_batches = length_buckets
    return masked


def next_token_targets(inputs: torch.Tensor) -> torch.Tensor:
    """``(n, T)`` targets of a causal LM on ``(n, 2, T)`` ids and mask: the ids, `IGNORE_INDEX` at padding."""
    return inputs[:, 0].masked_fill(inputs[:, 1] == 0, IGNORE_INDEX)
