"""Training views of the quantized low-rank layers (`workbench.layers.quant_lowrank`).

Both store symmetric codes ``c`` in ``[1, 2^b - 1]`` with ``w = s * (c - 2^(b-1))`` per row (or one
``s``): the grid of a `FakeQuantLayer` with signed codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``.

- `QuantLowRankView` (``svd_quant``): ``x -> A_hat (B_hat x) + bias``, each factor a
  `FakeQuantLayer` on its own PTQ steps;
- `LowRankResidualView` (``svd_residual``): ``x -> Q_hat x + A (B x) + bias``, the float factors
  trained as they are and the residual ``Q`` a `FakeQuantLayer`.

``repack()`` stores the trained codes with the same rank, bits and steps (the same bytes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.kernels import quant as quant_kernels
from workbench.layers.quant_lowrank import LowRankResidualLinear, QuantLowRankLinear
from workbench.recovery.lsq import FakeQuantLayer


def _fake_quant(weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int) -> FakeQuantLayer:
    """A `FakeQuantLayer` over a Linear holding ``weight: (out, in)`` on steps ``scale: (out,)`` or ``()``."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach())
    step = scale.detach().reshape(-1, 1) if scale.dim() else scale.detach()
    q = 2 ** (bits - 1) - 1
    return FakeQuantLayer(linear.to(weight.device), step.clone(), bits, qn=q, qp=q, learn_scale=False)


def _packed(view: FakeQuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed codes in [1, 2^b - 1], steps)`` of a factor view (steps as stored: ``(rows,)`` or ``()``)."""
    codes = view.codes().to(torch.int16) + 2 ** (view.bits - 1)
    scale = view.scale.detach().abs().clamp_min(1e-12)
    return quant_kernels.pack_codes(codes.to(torch.uint8), view.bits), scale.reshape(-1) if scale.dim() else scale


class QuantLowRankView(nn.Module):
    """View of a `QuantLowRankLinear`: ``first`` (``B: (r, in)``) and ``second`` (``A: (out, r)``, bias)."""

    def __init__(self, packed: QuantLowRankLinear):
        super().__init__()
        self.bits, self.per_channel = packed.bits, packed.per_channel
        self.first = _fake_quant(packed.first_weight(), packed.first_scale, None, packed.bits)
        self.second = _fake_quant(packed.second_weight(), packed.second_scale, packed.bias, packed.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    @torch.no_grad()
    def repack(self) -> QuantLowRankLinear:
        rank, width = self.first.layer.weight.shape
        out = self.second.layer.weight.shape[0]
        bias = self.second.layer.bias
        layer = QuantLowRankLinear(width, out, rank, self.bits, self.per_channel, bias is not None)
        layer = layer.to(self.first.layer.weight.device)
        for prefix, view in (("first", self.first), ("second", self.second)):
            codes, scale = _packed(view)
            getattr(layer, f"{prefix}_packed").copy_(codes)
            getattr(layer, f"{prefix}_scale").copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer


class LowRankResidualView(nn.Module):
    """View of a `LowRankResidualLinear`: float ``first``/``second`` factors, ``residual`` fake-quantized (with bias)."""

    def __init__(self, packed: LowRankResidualLinear):
        super().__init__()
        self.bits = packed.bits
        self.first = nn.Parameter(packed.first.detach().clone())
        self.second = nn.Parameter(packed.second.detach().clone())
        self.residual = _fake_quant(packed.residual_weight(), packed.residual_scale, packed.bias, packed.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + F.linear(F.linear(x, self.first), self.second)

    @torch.no_grad()
    def repack(self) -> LowRankResidualLinear:
        out, width = self.residual.layer.weight.shape
        bias = self.residual.layer.bias
        layer = LowRankResidualLinear(width, out, self.first.shape[0], self.bits, bias is not None).to(self.first.device)
        codes, scale = _packed(self.residual)
        layer.first.copy_(self.first)
        layer.second.copy_(self.second)
        layer.residual_packed.copy_(codes)
        layer.residual_scale.copy_(scale)
        if bias is not None:
            layer.bias.copy_(bias)
        return layer
