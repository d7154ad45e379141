"""Training views for the compressed layer types of other families (sparse, packed-quantized).

Imported lazily by `workbench.recovery.views.trainable`; each block registers a view only when
the layer type exists in this install.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from workbench.recovery.views import MaskedLayer, register_view

try:
    from workbench.layers.sparse import SparseConv2d, SparseLinear
except ImportError:  # pragma: no cover - the pruning family is not installed
    SparseLinear = SparseConv2d = None


def _repack_sparse(dense: nn.Module, mask: torch.Tensor, layer_type: type, fmt: str) -> nn.Module:
    """The sparse layer storing ``dense.weight`` where ``mask`` is True, in format ``fmt``."""
    return layer_type.from_masked(dense, mask, format=fmt)


def _sparse_view(module: nn.Module) -> MaskedLayer:
    """Dense float copy of a sparse layer's kept weights under its fixed mask."""
    dense, mask = module.to_masked()
    return MaskedLayer(dense, mask, pack=functools.partial(_repack_sparse, layer_type=type(module),
                                                           fmt=module.format))


if SparseLinear is not None:
    register_view(SparseLinear, _sparse_view)
    register_view(SparseConv2d, _sparse_view)

try:
    from workbench.layers.quantized import QuantConv2d, QuantLinear
except ImportError:  # pragma: no cover - the quantization family is not installed
    QuantLinear = QuantConv2d = None


def _quant_view(module: nn.Module) -> nn.Module | None:
    """Float weights on the layer's own symmetric uniform grid, trained through the STE.

    Only symmetric uniform layers of 2+ bits have a view (codes ``[-(2^(b-1)-1), 2^(b-1)-1]``, the PTQ grid
    kept as it is); asymmetric and k-means layers return None and stay frozen.
    """
    from workbench.recovery.qat import FakeQuantLayer

    if module.scheme != "uniform" or module.asymmetric or module.bits < 2:
        return None
    bits = module.bits
    q = 2 ** (bits - 1) - 1
    scale = module.scale.detach().clone()
    if scale.numel() > 1:
        scale = scale.reshape(module.weight_shape[0], *([1] * (len(module.weight_shape) - 1)))
    return FakeQuantLayer(module.to_float(), scale, bits, qn=q, qp=q,
                          pack=functools.partial(type(module).from_signed_codes, bits=bits))


if QuantLinear is not None:
    register_view(QuantLinear, _quant_view)
    register_view(QuantConv2d, _quant_view)

try:
    from workbench.layers.quantized import Int8Linear
except ImportError:  # pragma: no cover
    Int8Linear = None


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
    from workbench.recovery.qat import FakeQuantLayer

    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(module.dequantized_weight())
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    return FakeQuantLayer(linear, module.weight_scale.detach().reshape(-1, 1).clone(), 8, qn=127, qp=127,
                          pack=_repack_int8)


if Int8Linear is not None:
    register_view(Int8Linear, _int8_view)
