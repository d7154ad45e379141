"""Where a model's tensors live: its device, moving data there, waiting for it before a clock is read.

A model on a CUDA device stays there: calibration, SVDs, the engine, recovery and measurements run
on ``model_device(model)``, and the data a model runs on is moved there with `to_device`. On the
CPU every function here is a no-op (the same tensor objects come back), so CPU results are unchanged.
"""
from __future__ import annotations

import copy
from collections.abc import MutableMapping
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter, else of its first buffer; ``cpu`` when it has
    neither (a parameter-free model runs wherever its inputs are)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device | str) -> Any:
    """``value`` with every tensor moved to ``device``: a tensor, or tuples, lists and dicts of them
    (nested; other values unchanged). A tensor already there is returned itself, not copied; a
    container is copied, never changed in place."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, MutableMapping):  # a dict, OrderedDict, or a dict-like batch (tokenizer output)
        moved = copy.copy(value)
        for key, item in value.items():
            moved[key] = to_device(item, device)
        return moved
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(to_device(item, device) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    return value


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously: read a clock only after
    this); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
