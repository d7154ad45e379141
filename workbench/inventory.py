"""Which layers of a model can be compressed, and the weight matrix each is judged by."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError

MATRIX_LAYERS = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer: qualified ``name``, ``kind`` ("linear"/"conv"), matrix ``shape`` (out, in*k*k)."""

    name: str
    kind: str
    shape: tuple[int, int]
    params: int


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` matrix of a Linear, or a Conv2d's kernel reshaped to ``(out, in*kh*kw)``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if isinstance(module, nn.Conv2d):
        return module.weight.detach().reshape(module.out_channels, -1)
    raise UnsupportedLayerError(f"no weight matrix for {type(module).__name__}; supported: Linear, Conv2d")


def skip_reason(module: nn.Module) -> str | None:
    """Why a Linear/Conv2d is not offered for matrix compression (None if it is)."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"grouped conv (groups={module.groups}): no shared input to factor; left dense"
    return None


def shared_weight_groups(model: nn.Module) -> list[list[str]]:
    """Names of modules that hold the SAME weight Parameter (tied weights), one list per weight."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and name not in owners.get(id(weight), []):
            owners.setdefault(id(weight), []).append(name)
    return [names for names in owners.values() if len(names) > 1]


def matrix_layers(model: nn.Module) -> list[LayerInfo]:
    """Every Linear and (ungrouped) Conv2d in ``model``, in module order.

    Layers whose weight is tied to another module's are left out: compressing one copy would
    store the weight twice (factors here, dense there).
    """
    layers = []
    tied = {name for group in shared_weight_groups(model) for name in group}
    for name, module in model.named_modules():
        if isinstance(module, MATRIX_LAYERS) and skip_reason(module) is None and name not in tied:
            shape = tuple(weight_matrix(module).shape)
            kind = "linear" if isinstance(module, nn.Linear) else "conv"
            params = sum(p.numel() for p in module.parameters(recurse=False))
            layers.append(LayerInfo(name, kind, shape, params))
    return layers


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists the available layer names."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = ", ".join(info.name for info in matrix_layers(model)) or "(none)"
        raise WorkbenchError(f"unknown layer {name!r}; compressible layers: {known}") from None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
