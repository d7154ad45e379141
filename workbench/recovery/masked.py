"""Training view of a pruned layer: a dense Linear/Conv2d under a fixed 0/1 mask."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError

Packer = Callable[[nn.Module, torch.Tensor], nn.Module]


def dense_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
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
        return dense_forward(self.layer, x, self.layer.weight * self.mask)

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
