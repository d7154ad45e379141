"""The hyper-parameters of a Conv2d, so that layers storing a compressed kernel can run it."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _reverse_repeat_tuple


@dataclass(frozen=True)
class ConvSpec:
    """Stride, padding, dilation, groups and padding mode of an ``nn.Conv2d``."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    padding_mode: str

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ConvSpec":
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                   tuple(conv.dilation), conv.groups, conv.padding_mode)

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``conv2d(x: (n, in, h, w), weight: weight_shape) -> (n, out, h', w')`` as ``nn.Conv2d`` would."""
        if self.padding_mode != "zeros":
            pad = _reverse_repeat_tuple(self.padding, 2)
            x = F.pad(x, pad, mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def to_conv(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
        """A dense ``nn.Conv2d`` with these settings holding copies of ``weight`` and ``bias``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias is not None, self.padding_mode).to(weight.device)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")
