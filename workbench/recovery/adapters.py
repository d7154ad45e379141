"""Training views of the built-in compressed layer types: the explicit table `VIEWS`.

Sparse layers train as a `MaskedLayer` under their fixed mask; symmetric uniform packed layers
and `Int8Linear` train as a `FakeQuantLayer` on their own grid, GPTQ's `GroupQuantLinear` as a
`GroupFakeQuantLayer` on its per-group grid, the quantized low-rank layers through
`workbench.recovery.quant_lowrank_views`. Float low-rank layers need no view.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from workbench.layers.grouped import GroupQuantLinear
from workbench.layers.quant_lowrank import LowRankResidualLinear, QuantLowRankLinear
from workbench.layers.quantized import Int8Linear, QuantConv2d, QuantLinear
from workbench.layers.sparse import SparseConv2d, SparseLinear
from workbench.recovery.group_lsq import GroupFakeQuantLayer
from workbench.recovery.lsq import FakeQuantLayer
from workbench.recovery.masked import MaskedLayer
from workbench.recovery.quant_lowrank_views import LowRankResidualView, QuantLowRankView


def _repack_sparse(dense: nn.Module, mask: torch.Tensor, layer_type: type, fmt: str) -> nn.Module:
    """The sparse layer storing ``dense.weight`` where ``mask`` is True, in format ``fmt``."""
    return layer_type.from_masked(dense, mask, format=fmt)


def _sparse_view(module: nn.Module) -> MaskedLayer:
    """Dense float copy of a sparse layer's kept weights under its fixed mask."""
    dense, mask = module.to_masked()
    return MaskedLayer(dense, mask, pack=functools.partial(_repack_sparse, layer_type=type(module),
                                                           fmt=module.format))



def _quant_view(module: nn.Module) -> nn.Module | None:
    """Float weights on the layer's own symmetric uniform grid, trained through the STE.

    Only symmetric uniform layers of 2+ bits have a view (codes ``[-(2^(b-1)-1), 2^(b-1)-1]``, the PTQ grid
    kept as it is); asymmetric and k-means layers return None and stay frozen.
    """
    if module.scheme != "uniform" or module.asymmetric or module.bits < 2:
        return None
    bits = module.bits
    q = 2 ** (bits - 1) - 1
    scale = module.scale.detach().clone()
    if scale.numel() > 1:
        scale = scale.reshape(module.weight_shape[0], *([1] * (len(module.weight_shape) - 1)))
    return FakeQuantLayer(module.to_float(), scale, bits, qn=q, qp=q,
                          pack=functools.partial(type(module).from_signed_codes, bits=bits))



def _repack_int8(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 layer: nn.Linear) -> nn.Module:
    """An `Int8Linear` holding int8 ``codes (out, in)`` and per-row ``scale (out, 1)``."""
    packed = Int8Linear(layer.in_features, layer.out_features, bias is not None)
    with torch.no_grad():
        packed.weight_int8.copy_(codes.to(torch.int8))
        packed.weight_scale.copy_(scale.reshape(-1))
        if bias is not None:
            packed.bias.copy_(bias.detach())
    return packed


def _int8_view(module: nn.Module) -> nn.Module:
    """Float weights on the int8 per-row grid (codes in [-127, 127]); activations stay float while
    training (the dynamic int8 kernel has no gradient), as in weight-only QAT."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None).to(module.weight_int8.device)
    with torch.no_grad():
        linear.weight.copy_(module.dequantized_weight())
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    return FakeQuantLayer(linear, module.weight_scale.detach().reshape(-1, 1).clone(), 8, qn=127, qp=127,
                          pack=_repack_int8)


VIEWS: dict[type, Callable[[nn.Module], nn.Module | None]] = {
    SparseLinear: _sparse_view, SparseConv2d: _sparse_view,
    QuantLinear: _quant_view, QuantConv2d: _quant_view,
    Int8Linear: _int8_view,
    GroupQuantLinear: GroupFakeQuantLayer.from_packed,
    QuantLowRankLinear: QuantLowRankView, LowRankResidualLinear: LowRankResidualView,
}
