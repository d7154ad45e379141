"""Training view of `GroupQuantLinear` (GPTQ / round-to-nearest codes with one grid per group of inputs).

The layer's weight is ``W = s_g * (c - z_g) / a`` with codes ``c`` in ``[0, 2^b)``, a float16 scale
``s_g`` and integer zero point ``z_g`` per (row, group of ``group_size`` inputs), and AWQ's float16
``a: (in,)`` (1 without AWQ). The view keeps float latent weights ``W`` (starting at the layer's
own dequantized weight) and sees them through the layer's OWN grid:

    c = clip(round_ste(W * a / s_g) + z_g, 0, 2^b - 1),      W_hat = s_g * (c - z_g) / a,

so at the start its forward is the layer's, and training moves weights between grid points
(straight-through estimator; `workbench.recovery.lsq`). Zero points and ``a`` stay as stored. The
scales stay fixed by default; learned (LSQ, gradient scale ``1 / sqrt(group_size * (2^b - 1))``)
they are seen through their float16 rounding, the value `repack` stores, so the re-packed layer
computes exactly what the view computed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workbench.kernels.gptq import SCALE_MAX, SCALE_MIN, dequantize_groups
from workbench.layers.grouped import GroupQuantLinear
from workbench.recovery.lsq import QuantView, grad_scale, round_ste, ste


class GroupFakeQuantLayer(QuantView):
    """Float view of a `GroupQuantLinear`: ``(…, in) -> (…, out)``; ``repack()`` gives the packed layer.

    ``layer``: a dense ``nn.Linear`` with the latent weight ``(out, in)`` and bias; ``scale``
    ``(out, groups)`` (a parameter, frozen unless ``learn_scale``); buffers ``zero_point`` uint8
    ``(out, groups)`` and ``input_scale`` float16 ``(in,)`` or None. Build it with `from_packed`.
    """

    def __init__(self, packed: GroupQuantLinear, learn_scale: bool = False):
        super().__init__()
        self.bits, self.group_size, self.asymmetric = packed.bits, packed.group_size, packed.asymmetric
        self.layer = packed.to_float()
        self.scale = torch.nn.Parameter(packed.scale.detach().float().clone(), requires_grad=learn_scale)
        self.register_buffer("zero_point", packed.zero_point.detach().clone())
        self.register_buffer("input_scale", None if packed.input_scale is None else packed.input_scale.detach().clone())

    @classmethod
    def from_packed(cls, packed: GroupQuantLinear) -> "GroupFakeQuantLayer":
        """The view of ``packed`` (never modified), its forward equal to the layer's."""
        return cls(packed)

    def _stored_scale(self) -> torch.Tensor:
        """``(out, groups)``: the float16 value of each step (what `repack` stores), LSQ gradients."""
        step = grad_scale(self.scale.clamp(SCALE_MIN, SCALE_MAX), 1.0 / math.sqrt(self.group_size * (2 ** self.bits - 1)))
        return ste(step, self.scale.detach().clamp(SCALE_MIN, SCALE_MAX).half().float())

    def _codes(self, scale: torch.Tensor) -> torch.Tensor:
        """Float codes ``(out, in)`` in ``[0, 2^bits)`` of the latent weights on ``scale: (out, groups)``."""
        w = self.layer.weight
        if self.input_scale is not None:
            w = w * self.input_scale.float()
        step = scale.repeat_interleave(self.group_size, dim=1)
        zero = self.zero_point.float().repeat_interleave(self.group_size, dim=1)
        return torch.clamp(round_ste(w / step) + zero, 0, 2 ** self.bits - 1)

    def quantized_weight(self) -> torch.Tensor:
        """``(out, in)`` float32 weight on the layer's grid (differentiable through the STE)."""
        scale = self._stored_scale()
        weight = dequantize_groups(self._codes(scale), scale, self.zero_point)
        return weight if self.input_scale is None else weight / self.input_scale.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), self.layer.bias)

    @torch.no_grad()
    def repack(self) -> GroupQuantLinear:
        """The `GroupQuantLinear` of the current weights: same bits, groups, zero points and bytes."""
        scale = self.scale.clamp(SCALE_MIN, SCALE_MAX).half()
        codes = self._codes(scale.float()).to(torch.uint8)
        return GroupQuantLinear.from_codes(codes, scale, self.zero_point, self.layer.bias, self.bits,
                                           self.asymmetric, input_scale=self.input_scale)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, group_size={self.group_size}, asymmetric={self.asymmetric}, "
                f"input_scaled={self.input_scale is not None}, learn_scale={self.scale.requires_grad}")
