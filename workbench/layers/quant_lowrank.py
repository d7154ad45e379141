"""Linear layers combining low rank and quantization (`workbench.kernels.quant_lowrank`).

`QuantLowRankLinear` (method ``svd_quant``): ``x -> (x B^T) A^T + bias``, both factors held as
packed ``bits``-bit codes plus float32 scales. State: ``first_packed`` (codes of ``B: (r, in)``),
``first_scale`` ``(r,)`` or ``()``, ``second_packed`` (codes of ``A: (out, r)``), ``second_scale``
``(out,)`` or ``()``, ``bias``.

`LowRankResidualLinear` (method ``svd_residual``): ``x -> x Q^T + (x B^T) A^T + bias`` with
``W ~ A B + Q``. State: ``first`` ``B: (r, in)`` and ``second`` ``A: (out, r)`` in float32,
``residual_packed`` (codes of ``Q: (out, in)``), ``residual_scale`` ``(out,)``, ``bias``.

Both unpack and dequantize their codes once per forward and run float matmuls: they save bytes,
not time (the residual layer even runs the dense matmul plus the two small ones).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError
from workbench.kernels import quant as quant_kernels
from workbench.kernels import quant_lowrank as qlr
from workbench.kernels import svd as svd_kernels


def _codes_buffer(count: int, bits: int) -> torch.Tensor:
    return torch.zeros(quant_kernels.packed_size(count, bits), dtype=torch.uint8)


def _check_linear(linear: nn.Module, cls: type) -> None:
    if not isinstance(linear, nn.Linear):
        raise UnsupportedLayerError(f"{cls.__name__}.from_linear needs nn.Linear, got {type(linear).__name__}")


class QuantLowRankLinear(nn.Module):
    """``(…, in) -> (…, out)`` through rank ``rank``, the two factors stored as ``bits``-bit codes."""

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, per_channel: bool = True,
                 bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.bits, self.per_channel = bits, per_channel
        self.register_buffer("first_packed", _codes_buffer(rank * in_features, bits))
        self.register_buffer("first_scale", torch.ones(rank) if per_channel else torch.ones(()))
        self.register_buffer("second_packed", _codes_buffer(out_features * rank, bits))
        self.register_buffer("second_scale", torch.ones(out_features) if per_channel else torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, bits: int, per_channel: bool = True,
                    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                    name: str = "") -> "QuantLowRankLinear":
        """Quantize the rank-``rank`` factors of ``linear.weight: (out, in)``; ``linear`` unchanged.

        ``factors``: precomputed ``(a: (out, rank), b: (rank, in))`` (the engine's cached SVD).
        """
        _check_linear(linear, cls)
        w = linear.weight.detach()
        svd_kernels.check_rank(rank, tuple(w.shape), name)
        qlr.check_bits(bits, name, "svd_quant")
        a, b = factors if factors is not None else svd_kernels.truncate(w, rank)
        layer = cls(linear.in_features, linear.out_features, rank, bits, per_channel, linear.bias is not None)
        first_codes, first_scale = qlr.quantize_rows(b, bits, per_channel)
        second_codes, second_scale = qlr.quantize_rows(a, bits, per_channel)
        with torch.no_grad():
            layer.first_packed.copy_(quant_kernels.pack_codes(first_codes, bits))
            layer.first_scale.copy_(first_scale)
            layer.second_packed.copy_(quant_kernels.pack_codes(second_codes, bits))
            layer.second_scale.copy_(second_scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def _factor(self, packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        codes = quant_kernels.unpack_codes(packed, self.bits, shape[0] * shape[1]).reshape(shape)
        return qlr.dequantize_rows(codes, scale, self.bits)

    def first_weight(self) -> torch.Tensor:
        """Dequantized ``B: (rank, in)``, float32."""
        return self._factor(self.first_packed, self.first_scale, (self.rank, self.in_features))

    def second_weight(self) -> torch.Tensor:
        """Dequantized ``A: (out, rank)``, float32."""
        return self._factor(self.second_packed, self.second_scale, (self.out_features, self.rank))

    def dense_weight_preview(self) -> torch.Tensor:
        """PREVIEW ONLY: the dense ``(out, in)`` product ``A B``. Not used by ``forward``."""
        return self.second_weight() @ self.first_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.first_weight().to(x.dtype)), self.second_weight().to(x.dtype), self.bias)

    def stored_weights(self) -> int:
        """One code per factor entry plus bias entries (`workbench.measure.count_params`)."""
        return self.rank * (self.in_features + self.out_features) + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}, per_channel={self.per_channel}")


class LowRankResidualLinear(nn.Module):
    """``(…, in) -> (…, out)``: float32 rank-``rank`` factors plus a ``bits``-bit residual per row."""

    def __init__(self, in_features: int, out_features: int, rank: int, bits: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.bits = in_features, out_features, rank, bits
        self.first = nn.Parameter(torch.zeros(rank, in_features))
        self.second = nn.Parameter(torch.zeros(out_features, rank))
        self.register_buffer("residual_packed", _codes_buffer(out_features * in_features, bits))
        self.register_buffer("residual_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, bits: int,
                    factors: tuple[torch.Tensor, torch.Tensor] | None = None, steps: int = qlr.REFINE_STEPS,
                    name: str = "") -> "LowRankResidualLinear":
        """Fit ``linear.weight ~ A B + Q(W - A B)`` (`workbench.kernels.quant_lowrank.residual_fit`,
        starting from ``factors`` when given); ``linear`` unchanged."""
        _check_linear(linear, cls)
        w = linear.weight.detach()
        svd_kernels.check_rank(rank, tuple(w.shape), name)
        qlr.check_bits(bits, name, "svd_residual")
        fit = qlr.residual_fit(w, rank, bits, factors=factors, steps=steps)
        layer = cls(linear.in_features, linear.out_features, rank, bits, linear.bias is not None)
        with torch.no_grad():
            layer.first.copy_(fit.b)
            layer.second.copy_(fit.a)
            layer.residual_packed.copy_(quant_kernels.pack_codes(fit.codes, bits))
            layer.residual_scale.copy_(fit.scale)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def residual_weight(self) -> torch.Tensor:
        """Dequantized residual ``Q: (out, in)``, float32."""
        codes = quant_kernels.unpack_codes(self.residual_packed, self.bits, self.out_features * self.in_features)
        return qlr.dequantize_rows(codes.reshape(self.out_features, self.in_features), self.residual_scale, self.bits)

    def dense_weight_preview(self) -> torch.Tensor:
        """PREVIEW ONLY: ``A B + Q``, ``(out, in)``. Not used by ``forward``."""
        return self.second.detach() @ self.first.detach() + self.residual_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = F.linear(x, self.residual_weight().to(x.dtype), self.bias)
        return dense + F.linear(F.linear(x, self.first), self.second)

    def stored_weights(self) -> int:
        """Factor entries, one code per residual entry, bias entries (`workbench.measure.count_params`)."""
        return (self.rank * (self.in_features + self.out_features) + self.out_features * self.in_features
                + (0 if self.bias is None else self.bias.numel()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bits={self.bits}")
