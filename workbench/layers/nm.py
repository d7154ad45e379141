"""`NMSparseLinear`: an ``nn.Linear`` with N:M semi-structured sparsity, stored as kept values + index codes.

In its ``state_dict``: ``values`` float ``(out, in * n / m)`` (the kept weights in input order),
``codes`` uint8 (one ``ceil(log2 C(m, n))``-bit index code per group of ``m`` inputs, bit-packed;
`workbench.kernels.nm`) and ``bias``. 2:4 in float32 takes ``0.5 * 4 + 3 / 32`` bytes per weight
(53% of dense); 4:8, ``0.5 * 4 + 7 / 64`` (53%).

``forward`` scatters the values into a dense weight and runs ``F.linear``: PyTorch's
semi-structured kernels (``torch.sparse.to_sparse_semi_structured``) are CUDA-only ("Only CUDA
tensors are currently supported", torch 2.13 CPU), so on a CPU the layer saves bytes, not time
(`workbench.methods.nm_sparsity.nm_latency` measures it). The input index of each value is decoded
once and kept in a non-persistent buffer (int32; not saved), refreshed when a state dict is loaded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import nm as nm_kernels
from workbench.kernels.quant import packed_size
from workbench.layers.sparse import masked_linear


def _refresh_after_load(module: "NMSparseLinear", incompatible_keys) -> None:
    module._refresh()


class NMSparseLinear(nn.Module):
    """``(…, in) -> (…, out)`` keeping ``n`` of every ``m`` consecutive input weights of each output row."""

    def __init__(self, in_features: int, out_features: int, n: int = 2, m: int = 4, bias: bool = True):
        super().__init__()
        nm_kernels.check_nm(n, m, in_features)
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        groups = out_features * in_features // m
        self.register_buffer("values", torch.zeros(out_features, in_features * n // m))
        self.register_buffer("codes", torch.zeros(packed_size(groups, nm_kernels.code_bits(n, m)), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("columns", torch.zeros(0, dtype=torch.int32), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @classmethod
    def from_linear(cls, linear: nn.Linear, n: int = 2, m: int = 4, name: str = "",
                    mask: torch.Tensor | None = None) -> "NMSparseLinear":
        """Keep the ``n`` largest ``|w|`` of every ``m`` inputs of ``linear`` (or ``mask``, an N:M
        bool ``(out, in)``); ``linear`` unchanged."""
        if not isinstance(linear, nn.Linear):
            raise UnsupportedLayerError(f"NMSparseLinear.from_linear needs nn.Linear, got {type(linear).__name__} "
                                        f"for layer {name!r}")
        nm_kernels.check_nm(n, m, linear.in_features, name)
        if mask is None:
            mask = nm_kernels.nm_mask(linear.weight, n, m, name)
        elif tuple(mask.shape) != tuple(linear.weight.shape):
            raise WorkbenchError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(linear.weight.shape)}")
        layer = cls(linear.in_features, linear.out_features, n, m, bias=linear.bias is not None)
        values, codes = nm_kernels.encode(linear.weight, mask.to(torch.bool), n, m)
        layer = layer.to(device=values.device, dtype=values.dtype)
        with torch.no_grad():
            layer.values.copy_(values)
            layer.codes.copy_(codes)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer._refresh()
        return layer

    from_masked = from_linear

    def _refresh(self) -> None:
        """Decode the input index of every stored value into the ``columns`` buffer."""
        self.columns = nm_kernels.kept_columns(self.codes, self.n, self.m, self.out_features,
                                               self.in_features).to(torch.int32)

    def mask(self) -> torch.Tensor:
        """bool ``(out, in)``: True where a weight is kept (exactly ``n`` per group of ``m``)."""
        return torch.zeros(self.out_features, self.in_features, dtype=torch.bool,
                           device=self.values.device).scatter_(1, self.columns.long(), True)

    def dense_weight(self) -> torch.Tensor:
        """``(out, in)`` weight with zeros at pruned entries, from the stored values."""
        return self.values.new_zeros(self.out_features, self.in_features).scatter_(1, self.columns.long(), self.values)

    def to_masked(self) -> tuple[nn.Linear, torch.Tensor]:
        """``(dense nn.Linear with zeros at pruned entries, bool mask (out, in))``."""
        return masked_linear(self.dense_weight(), self.bias, self.mask())

    def payload_bytes(self) -> int:
        """Bytes of the state dict's tensors: `workbench.kernels.nm.nm_bytes` for this layer's dtype."""
        return nm_kernels.nm_bytes(self.out_features, self.in_features, self.n, self.m,
                                   self.values.element_size(), bias=False) + (
            0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def stored_weights(self) -> int:
        """Kept weights plus bias entries (used by `workbench.measure.count_params`)."""
        return self.values.numel() + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}, "
                f"code_bits={nm_kernels.code_bits(self.n, self.m)}")
