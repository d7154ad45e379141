"""`GroupQuantLinear`: a Linear whose weight is packed b-bit codes with one grid per group of inputs.

``state_dict``:

- ``packed``: uint8, the ``(out, in)`` codes row-major at ``bits`` bits each
  (`workbench.kernels.quant.pack_codes`): ``ceil(out * in * bits / 8)`` bytes;
- ``scale``: float16 ``(out, groups)``; ``zero_point``: uint8 ``(out, groups)`` (integer zero
  points in ``[0, 2^bits)``), ``groups = in // group_size`` (1: per output channel);
- ``input_scale`` (only when ``input_scaled``, AWQ): float16 ``(in,)``, the weight's columns
  were multiplied by it before quantizing and are divided by it after;
- ``bias``: float, as the original's.

So ``bytes = ceil(out * in * bits / 8) + 3 * out * groups (+ 2 * in) (+ bias)``. ``forward`` unpacks,
dequantizes ``w = scale * (code - zero_point)`` per group and runs ``F.linear``: the saving is in
bytes, not in time. The codes come from any quantizer on that grid (GPTQ:
`workbench.kernels.gptq.gptq_quantize`; round-to-nearest: `rtn_quantize`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.kernels import gptq as gptq_kernels
from workbench.kernels import quant as quant_kernels
from workbench.layers.quantized import dense_linear


class GroupQuantLinear(nn.Module):
    """``nn.Linear`` with packed ``bits``-bit codes and per-group scales; ``(…, in) -> (…, out)``.

    ``group_size``: inputs sharing one grid (a divisor of ``in_features``); None means one grid
    per output row (``group_size = in_features``). Built empty (zero codes, unit scales): fill it
    with `from_codes`, or load a state_dict.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 bias: bool = True, asymmetric: bool = True, name: str = "", input_scaled: bool = False):
        super().__init__()
        gptq_kernels.check_gptq_bits(bits, name)
        self.group_size = gptq_kernels.check_group_size(group_size, in_features, name)
        self.in_features, self.out_features, self.bits, self.asymmetric = in_features, out_features, bits, asymmetric
        groups = in_features // self.group_size
        self.register_buffer("packed", torch.zeros(quant_kernels.packed_size(out_features * in_features, bits),
                                                   dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("zero_point", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float16) if input_scaled else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   bias: torch.Tensor | None, bits: int, asymmetric: bool = True, name: str = "",
                   input_scale: torch.Tensor | None = None) -> "GroupQuantLinear":
        """Pack ``codes: (out, in)`` (ints in ``[0, 2^bits)``) with ``scale, zero_point: (out, groups)``.

        ``scale`` (and ``input_scale: (in,)``, AWQ) must hold float16 values and ``zero_point``
        integers (what the kernels return).
        """
        out, width = codes.shape
        group = width // scale.shape[1]
        layer = cls(width, out, bits, None if group == width else group, bias is not None, asymmetric, name,
                    input_scaled=input_scale is not None)
        with torch.no_grad():
            if input_scale is not None:
                layer.input_scale.copy_(input_scale.half())
            layer.packed.copy_(quant_kernels.pack_codes(codes, bits))
            layer.scale.copy_(scale.half())
            layer.zero_point.copy_(zero_point.round().to(torch.uint8))
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    @property
    def groups(self) -> int:
        return self.in_features // self.group_size

    def codes(self) -> torch.Tensor:
        """uint8 codes ``(out, in)``, unpacked from ``packed``."""
        count = self.out_features * self.in_features
        return quant_kernels.unpack_codes(self.packed, self.bits, count).reshape(self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``(out, in)``: the weights the codes stand for."""
        weight = gptq_kernels.dequantize_groups(self.codes(), self.scale, self.zero_point)
        return weight if self.input_scale is None else weight / self.input_scale.float()

    def to_float(self) -> nn.Linear:
        """A dense ``nn.Linear`` holding the dequantized weights."""
        return dense_linear(self.dequantized_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def stored_weights(self) -> int:
        """Weights (one code each) plus bias entries (used by `workbench.measure.count_params`)."""
        return self.out_features * self.in_features + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        grid = "per-channel" if self.groups == 1 else f"group_size={self.group_size}"
        kind = "asymmetric" if self.asymmetric else "symmetric"
        awq = ", input-scaled (AWQ)" if self.input_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"{kind} {grid}{awq}")
