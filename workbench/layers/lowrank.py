"""Low-rank layers built from an original layer by truncated SVD.

``LowRankLinear``: ``x -> second(first(x))`` with ``first: in -> r`` (no bias) and
``second: r -> out`` (the original bias). ``LowRankConv2d``: a k x k conv to r channels then a
1x1 conv to the output channels. Both store only the factors: ``r * (m + n)`` weights + bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError
from workbench.kernels import svd as svd_kernels


class LowRankLinear(nn.Module):
    """``(…, in) -> (…, out)`` through a rank-``rank`` bottleneck."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int,
                    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                    name: str = "") -> "LowRankLinear":
        """Factorize ``linear.weight: (out, in)`` at ``rank``; ``linear`` is not modified.

        ``factors``: precomputed ``(a: (out, rank), b: (rank, in))`` (e.g. activation-aware).
        """
        if not isinstance(linear, nn.Linear):
            raise UnsupportedLayerError(f"LowRankLinear.from_linear needs nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        svd_kernels.check_rank(rank, tuple(w.shape), name)
        a, b = factors if factors is not None else svd_kernels.truncate(w, rank)
        # Built on the meta device (no random init to throw away), then given real storage.
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                    device="meta", dtype=w.dtype).to_empty(device=w.device)
        with torch.no_grad():
            layer.first.weight.copy_(b)
            layer.second.weight.copy_(a)
            if linear.bias is not None:
                layer.second.bias.copy_(linear.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight_preview(self) -> torch.Tensor:
        """PREVIEW ONLY: the dense ``(out, in)`` product. Not used by ``forward``."""
        return self.second.weight @ self.first.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankConv2d(nn.Module):
    """A ``k x k`` conv to ``rank`` channels, then a ``1 x 1`` conv to ``out_channels``.

    Input ``(n, in, h, w)``, output as the original conv. Weights: ``rank*(in*k*k + out)`` + bias.
    """

    def __init__(self, conv: nn.Conv2d, rank: int, device=None, dtype=None):
        super().__init__()
        self.rank = rank
        self.first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, stride=conv.stride,
                               padding=conv.padding, dilation=conv.dilation, bias=False,
                               padding_mode=conv.padding_mode, device=device, dtype=dtype)
        self.second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None,
                                device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int,
                  factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                  name: str = "") -> "LowRankConv2d":
        """Factorize ``conv.weight`` reshaped to ``(out, in*kh*kw)`` at ``rank``; ``conv`` unchanged."""
        if not isinstance(conv, nn.Conv2d):
            raise UnsupportedLayerError(f"LowRankConv2d.from_conv needs nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise UnsupportedLayerError(
                f"layer {name!r} is a grouped conv (groups={conv.groups}); low-rank SVD needs groups=1, "
                "so it is left dense")
        w = conv.weight.detach()
        matrix = w.reshape(w.shape[0], -1)
        svd_kernels.check_rank(rank, tuple(matrix.shape), name)
        a, b = factors if factors is not None else svd_kernels.truncate(matrix, rank)
        layer = cls(conv, rank, device="meta", dtype=w.dtype).to_empty(device=w.device)
        with torch.no_grad():
            layer.first.weight.copy_(b.reshape(rank, *w.shape[1:]))
            layer.second.weight.copy_(a.reshape(w.shape[0], rank, 1, 1))
            if conv.bias is not None:
                layer.second.bias.copy_(conv.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class SlicedLowRank(nn.Module):
    """Evaluation-only view of a rank-r factorization: ``second(first(x))`` exactly as `LowRankLinear` /
    `LowRankConv2d` compute it, on the cached factors, without building their modules.

    ``first: (r, n)`` (conv: ``(r, in, kh, kw)``), ``second: (m, r)`` (conv: ``(out, r, 1, 1)``).
    For a Linear both are views of the cached factors, no copy: ``first`` a block of rows, and
    ``second`` the first ``r`` columns, a row-major matrix with a longer row stride, which BLAS
    multiplies by the same kernel as the real layer's contiguous weight (outputs bit-identical;
    `tests/test_engine.py` checks). Only the engine's working copy holds these (through the ``svd``
    method's ``view``); what is built for export comes from `workbench.apply`.
    """

    def __init__(self, original: nn.Module, a: torch.Tensor, b: torch.Tensor, channels_last: bool = False):
        super().__init__()
        self.conv = original if isinstance(original, nn.Conv2d) else None
        if self.conv is None:
            self.first, self.second = b, a
        else:
            w = original.weight
            layout = torch.channels_last if channels_last else torch.contiguous_format
            self.first = b.reshape(len(b), *w.shape[1:]).contiguous(memory_format=layout)
            self.second = a.reshape(w.shape[0], a.shape[1], 1, 1).contiguous(memory_format=layout)
        self.bias = None if original.bias is None else original.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.linear(F.linear(x, self.first), self.second, self.bias)
        c = self.conv
        return F.conv2d(F.conv2d(x, self.first, None, c.stride, c.padding, c.dilation), self.second, self.bias)
