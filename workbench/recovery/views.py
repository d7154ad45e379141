"""Trainable views of compressed layers, and re-packing them into compact storage after training.

A compressed layer stores something that cannot take a gradient step directly (sparse values,
packed integer codes). Fine-tuning swaps it, on a private copy of the model, for a *view* that
trains only what the compression left free, then swaps the view back for a compact layer:

- ``MaskedLayer``: a Linear/Conv2d whose weight is multiplied by a fixed 0/1 mask in ``forward``;
  pruned weights get no gradient and stay exactly zero after re-packing.
- ``workbench.recovery.qat.FakeQuantLayer``: float weights seen through a straight-through
  rounding to the integer grid (scales fixed, or learned for QAT).
- Low-rank layers are already trainable (their factors are ``nn.Parameter``s): no view needed.

A compressed layer type joins by ``register_view(layer_type, to_view)`` where
``to_view(module) -> view``; every view defines ``repack() -> compact module``. A layer may also
offer the protocol itself: a ``trainable_view()`` method returning such a view.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError

Packer = Callable[[nn.Module, torch.Tensor], nn.Module]

_VIEWS: dict[type, Callable[[nn.Module], nn.Module]] = {}


def register_view(layer_type: type, to_view: Callable[[nn.Module], nn.Module]) -> None:
    """Make `trainable` turn every ``layer_type`` module into ``to_view(module)``."""
    _VIEWS[layer_type] = to_view


def _view_for(module: nn.Module) -> nn.Module | None:
    for layer_type, to_view in _VIEWS.items():
        if type(module) is layer_type:
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
    _ensure_known_layers()
    return _swap_children(model, _view_for)


def repack(model: nn.Module) -> nn.Module:
    """Replace, IN PLACE, each training view by the compact layer it re-packs into; returns ``model``."""
    return _swap_children(model, lambda m: m.repack() if is_view(m) else None)


def _dense_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    raise UnsupportedLayerError(f"training views handle Linear and Conv2d, got {type(layer).__name__}")


class MaskedLayer(nn.Module):
    """Training view of a pruned Linear/Conv2d: ``forward`` uses ``layer.weight * mask``.

    ``layer``: a dense float ``nn.Linear``/``nn.Conv2d`` holding the kept values (zeros elsewhere);
    ``mask``: bool, shape of ``layer.weight`` (True = kept). Masked entries get zero gradient, so
    only kept weights (and the bias) train. ``pack(dense_layer, mask) -> compact module`` re-packs;
    without one, ``repack`` returns the dense layer with masked weights set to exactly zero.
    """

    def __init__(self, layer: nn.Module, mask: torch.Tensor, pack: Packer | None = None):
        super().__init__()
        if mask.shape != layer.weight.shape:
            raise UnsupportedLayerError(
                f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(layer.weight.shape)}")
        self.layer = layer
        self.register_buffer("mask", mask.to(torch.bool))
        self.pack = pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _dense_forward(self.layer, x, self.layer.weight * self.mask)

    @torch.no_grad()
    def masked_layer(self) -> nn.Module:
        """The dense layer with pruned entries exactly zero (kept values as trained)."""
        self.layer.weight.mul_(self.mask)
        return self.layer

    def repack(self) -> nn.Module:
        dense = self.masked_layer()
        return self.pack(dense, self.mask) if self.pack is not None else dense

    def extra_repr(self) -> str:
        return f"kept={int(self.mask.sum())}/{self.mask.numel()}"


def _ensure_known_layers() -> None:
    """Connect the views to the compressed layer types that exist in this install."""
    from workbench.recovery import adapters  # noqa: F401  (registers views of the packed/sparse layers)
