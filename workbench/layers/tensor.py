"""Convolutions rebuilt as sequences of smaller convolutions from a tensor decomposition.

Each class is an ``nn.Module`` that stores only the factor convolutions and runs them; input
``(n, in, h, w)`` and output ``(n, out, h', w')`` exactly as the original ``nn.Conv2d`` (same
stride, padding, dilation and padding mode). Build them with ``from_conv(conv, ...)``; the original
is never modified.

* `TuckerConv2d`: 1x1 (in -> r_in) -> kh x kw core (r_in -> r_out, the original stride/padding)
  -> 1x1 (r_out -> out, the original bias).
* `CPConv2d`: 1x1 (in -> R) -> kh x 1 depthwise -> 1 x kw depthwise -> 1x1 (R -> out, bias).
* `SpatialSVDConv2d`: kh x 1 (in -> R) -> 1 x kw (R -> out, bias).

Grouped and depthwise convs are refused: their kernel ``(out, in/groups, kh, kw)`` has no input
mode shared by all outputs, so the channel factorization would change what the layer computes.
"""
from __future__ import annotations

import torch
from torch import nn

from workbench.errors import UnsupportedLayerError
from workbench.kernels import tensor as tk


def check_conv(conv: nn.Module, name: str = "", what: str = "tensor decomposition") -> None:
    """Raise `UnsupportedLayerError` unless ``conv`` is an ungrouped ``nn.Conv2d``."""
    if not isinstance(conv, nn.Conv2d):
        raise UnsupportedLayerError(f"{what} needs nn.Conv2d, got {type(conv).__name__}"
                                    + (f" for layer {name!r}" if name else ""))
    if conv.groups != 1:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        raise UnsupportedLayerError(
            f"layer {name!r} is a {kind} conv (groups={conv.groups}): left dense because each group of "
            f"output channels sees only its own {conv.in_channels // conv.groups} input channel(s), so "
            f"there is no shared input mode for {what} to factor")


def _axis(value, axis: int):
    return value if isinstance(value, str) else value[axis]


def _padding_pair(conv: nn.Conv2d, vertical: bool):
    """Padding of a kh x 1 (``vertical``) or 1 x kw conv that reproduces one axis of ``conv``'s."""
    if isinstance(conv.padding, str):
        return conv.padding
    return (conv.padding[0], 0) if vertical else (0, conv.padding[1])


def _vertical(conv: nn.Conv2d, cin: int, cout: int, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, (conv.kernel_size[0], 1), stride=(conv.stride[0], 1),
                     padding=_padding_pair(conv, True), dilation=(conv.dilation[0], 1), groups=groups,
                     bias=bias, padding_mode=conv.padding_mode)


def _horizontal(conv: nn.Conv2d, cin: int, cout: int, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, (1, conv.kernel_size[1]), stride=(1, conv.stride[1]),
                     padding=_padding_pair(conv, False), dilation=(1, conv.dilation[1]), groups=groups,
                     bias=bias, padding_mode=conv.padding_mode)


class TuckerConv2d(nn.Module):
    """Tucker-2 convolution. Weights: ``in*r_in + r_out*r_in*kh*kw + r_out*out`` + bias."""

    def __init__(self, conv: nn.Conv2d, rank_out: int, rank_in: int):
        super().__init__()
        self.ranks = (rank_out, rank_in)
        self.first = nn.Conv2d(conv.in_channels, rank_in, 1, bias=False)
        self.core = nn.Conv2d(rank_in, rank_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
        self.last = nn.Conv2d(rank_out, conv.out_channels, 1, bias=conv.bias is not None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: tuple[int, int], factors: tk.Tucker2 | None = None,
                  name: str = "") -> "TuckerConv2d":
        """Tucker-2 of ``conv.weight`` at ``ranks = (rank_out, rank_in)`` (or given ``factors``)."""
        check_conv(conv, name, "Tucker-2")
        w = conv.weight.detach()
        r_out, r_in = tk.check_tucker_ranks(tuple(w.shape), ranks, name)
        f = factors if factors is not None else tk.tucker2(w, (r_out, r_in), name)
        layer = cls(conv, r_out, r_in).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(f.u_in.T.reshape(r_in, -1, 1, 1))
            layer.core.weight.copy_(f.core)
            layer.last.weight.copy_(f.u_out.reshape(-1, r_out, 1, 1))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def extra_repr(self) -> str:
        return f"rank_out={self.ranks[0]}, rank_in={self.ranks[1]}"


class CPConv2d(nn.Module):
    """CP convolution. Weights: ``R*(in + kh + kw + out)`` + bias."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        self.rank = rank
        self.first = nn.Conv2d(conv.in_channels, rank, 1, bias=False)
        self.vertical = _vertical(conv, rank, rank, groups=rank)
        self.horizontal = _horizontal(conv, rank, rank, groups=rank)
        self.last = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, factors: tk.CP | None = None,
                  name: str = "") -> "CPConv2d":
        """Rank-``rank`` CP of ``conv.weight`` (or given ``factors``); ``conv`` is not modified."""
        check_conv(conv, name, "CP decomposition")
        w = conv.weight.detach()
        rank = tk.check_cp_rank(tuple(w.shape), rank, name)
        f = factors if factors is not None else tk.cp(w, rank, name)
        layer = cls(conv, rank).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(f.inp.T.reshape(rank, -1, 1, 1))
            layer.vertical.weight.copy_(f.h.T.reshape(rank, 1, -1, 1))
            layer.horizontal.weight.copy_(f.w.T.reshape(rank, 1, 1, -1))
            layer.last.weight.copy_(f.out.reshape(-1, rank, 1, 1))
            if conv.bias is not None:
                layer.last.bias.copy_(conv.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class SpatialSVDConv2d(nn.Module):
    """``kh x 1`` conv to ``R`` channels, then ``1 x kw`` conv. Weights: ``R*(in*kh + out*kw)`` + bias."""

    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        self.rank = rank
        self.vertical = _vertical(conv, conv.in_channels, rank)
        self.horizontal = _horizontal(conv, rank, conv.out_channels, bias=conv.bias is not None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int, factors: tk.SpatialSVD | None = None,
                  name: str = "") -> "SpatialSVDConv2d":
        """Spatial SVD of ``conv.weight`` at ``rank`` (or given ``factors``); ``conv`` is not modified."""
        check_conv(conv, name, "spatial SVD")
        w = conv.weight.detach()
        rank = tk.check_spatial_rank(tuple(w.shape), rank, name)
        f = factors if factors is not None else tk.spatial_svd(w, rank, name)
        layer = cls(conv, rank).to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.vertical.weight.copy_(f.vertical)
            layer.horizontal.weight.copy_(f.horizontal)
            if conv.bias is not None:
                layer.horizontal.bias.copy_(conv.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.horizontal(self.vertical(x))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"
