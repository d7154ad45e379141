"""Trainable views of compressed layers, and re-packing them into compact storage after training.

A compressed layer stores something that cannot take a gradient step directly (sparse values,
packed integer codes). Fine-tuning swaps it, on a private copy of the model, for a *view* that
trains only what the compression left free, then swaps the view back for a compact layer:

- ``MaskedLayer``: a Linear/Conv2d whose weight is multiplied by a fixed 0/1 mask in ``forward``;
  pruned weights get no gradient and stay exactly zero after re-packing.
- ``workbench.recovery.lsq.FakeQuantLayer``: float weights seen through a straight-through
  rounding to the integer grid (scales fixed, or learned for QAT).
- ``workbench.recovery.group_lsq.GroupFakeQuantLayer``: GPTQ's per-group codes (`GroupQuantLinear`)
  the same way, on the layer's own scales, zero points and AWQ input scale;
- ``workbench.recovery.quant_lowrank_views``: quantized low-rank factors (``svd_quant``) and the
  quantized residual of ``svd_residual``, each factor a ``FakeQuantLayer``.
- Float low-rank layers are already trainable (their factors are ``nn.Parameter``s): no view needed.

The built-in views are the explicit table `workbench.recovery.adapters.VIEWS` (layer type ->
``to_view(module) -> view``); another compressed layer type joins with ``register_view(layer_type,
to_view)``, or by offering a ``trainable_view()`` method itself. Every view defines ``repack() ->
compact module``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from workbench.recovery.adapters import VIEWS
from workbench.recovery.masked import MaskedLayer, dense_forward

__all__ = ["MaskedLayer", "VIEWS", "dense_forward", "is_view", "register_view", "repack", "trainable"]


def register_view(layer_type: type, to_view: Callable[[nn.Module], nn.Module]) -> None:
    """Make `trainable` turn every ``layer_type`` module into ``to_view(module)``."""
    VIEWS[layer_type] = to_view


def _view_for(module: nn.Module) -> nn.Module | None:
    to_view = VIEWS.get(type(module))
    if to_view is not None:
        return to_view(module)
    if hasattr(module, "trainable_view") and not is_view(module):
        return module.trainable_view()
    return None


def is_view(module: nn.Module) -> bool:
    """True for a training view (it knows how to re-pack itself)."""
    return callable(getattr(module, "repack", None))


def _swap_children(model: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    replacement = swap(model)
    if replacement is not None:
        return replacement
    for name, child in list(model.named_children()):
        new = _swap_children(child, swap)
        if new is not child:
            setattr(model, name, new)
    return model


def trainable(model: nn.Module) -> nn.Module:
    """Replace, IN PLACE, each compressed layer of ``model`` by its training view; returns ``model``.

    Call it on a copy (`workbench.recovery.finetune` does). Layers with nothing to convert
    (dense layers, low-rank factors) are left as they are and train as plain parameters.
    """
    return _swap_children(model, _view_for)


def repack(model: nn.Module) -> nn.Module:
    """Replace, IN PLACE, each training view by the compact layer it re-packs into; returns ``model``."""
    return _swap_children(model, lambda m: m.repack() if is_view(m) else None)
