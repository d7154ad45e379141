"""Pruned Linear / Conv2d layers that store only the kept weights, so saved bytes fall with sparsity.

Two storage formats, chosen per layer to take the fewest bytes (``format="auto"``):

- ``"bitmap"``: a packed bit per weight (``ceil(numel / 8)`` bytes) + the kept values in row-major
  order. Bytes ``numel / 8 + 4 kept``: smaller than dense (``4 numel``) below ~97% density.
- ``"csr"``: compressed sparse rows of the ``(out, in*kh*kw)`` matrix: ``crow_indices`` int32
  ``(out + 1,)``, ``col_indices`` int16 (int32 when ``in*kh*kw >= 32768``), values. Bytes
  ``4 (out + 1) + 6 kept``: smaller than the bitmap when fewer than ~1/16 of the weights are kept.

``forward`` computes from that storage: CSR Linear layers multiply with ``torch.sparse`` (CSR x
dense); bitmap layers and convolutions scatter the values into a dense kernel first. On a CPU
the dense GEMM is so well tuned that the sparse product is usually SLOWER than the dense layer
below ~90-95% sparsity (see ``benchmarks/pruning_quant.py``): pruning here buys bytes, not speed.

Fine-tuning with a fixed mask: ``layer.to_masked() -> (dense_layer, mask)`` gives a
float ``nn.Linear``/``nn.Conv2d`` with zeros at pruned entries and the bool mask; after training,
``SparseLinear.from_masked(dense_layer, mask)`` (or ``SparseConv2d.from_masked``) re-packs it.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import prune as prune_kernels
from workbench.kernels.quant import pack_codes, unpack_codes
from workbench.layers.convspec import ConvSpec

FORMATS = ("auto", "bitmap", "csr")


def bitmap_bytes(numel: int, kept: int, value_bytes: int = 4) -> int:
    return (numel + 7) // 8 + value_bytes * kept


def csr_bytes(rows: int, cols: int, kept: int, value_bytes: int = 4) -> int:
    index_bytes = 2 if cols < 2 ** 15 else 4
    return 4 * (rows + 1) + (index_bytes + value_bytes) * kept


def choose_format(rows: int, cols: int, kept: int, value_bytes: int = 4) -> str:
    """The format with fewer payload bytes for a ``(rows, cols)`` matrix keeping ``kept`` weights."""
    return "csr" if csr_bytes(rows, cols, kept, value_bytes) < bitmap_bytes(rows * cols, kept, value_bytes) else "bitmap"


class _SparseWeight(nn.Module):
    """Shared storage of a pruned weight ``(out, ...)`` viewed as the matrix ``(out, cols)``."""

    def __init__(self, weight_shape: tuple[int, ...], fmt: str):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.format = fmt

    def _store(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None,
               fmt: str, name: str) -> None:
        if fmt not in FORMATS:
            raise WorkbenchError(f"format={fmt!r} must be one of {', '.join(FORMATS)}")
        if mask.shape != weight.shape:
            raise WorkbenchError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
        mask = mask.to(torch.bool)
        prune_kernels.check_not_empty(mask, name, "the mask")
        rows, cols = weight.shape[0], weight[0].numel()
        kept = int(mask.sum())
        if fmt == "auto":
            fmt = choose_format(rows, cols, kept, weight.element_size())
        self.format = fmt
        matrix_mask = mask.reshape(rows, cols)
        values = weight.detach().reshape(rows, cols)[matrix_mask].clone()
        self.register_buffer("values", values)
        if fmt == "bitmap":
            self.register_buffer("bitmap", pack_codes(mask.reshape(-1).to(torch.uint8), 1))
        else:
            index_dtype = torch.int16 if cols < 2 ** 15 else torch.int32
            counts = matrix_mask.sum(dim=1)
            crow = torch.zeros(rows + 1, dtype=torch.int32, device=weight.device)
            crow[1:] = counts.cumsum(0).to(torch.int32)
            cols_idx = matrix_mask.nonzero()[:, 1].to(index_dtype)
            self.register_buffer("crow_indices", crow)
            self.register_buffer("col_indices", cols_idx)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    # -- what is stored
    def mask(self) -> torch.Tensor:
        """bool ``weight_shape``: True where a weight is kept."""
        numel = 1
        for d in self.weight_shape:
            numel *= d
        if self.format == "bitmap":
            return unpack_codes(self.bitmap, 1, numel).to(torch.bool).reshape(self.weight_shape)
        return self._csr_mask()

    def _csr_mask(self) -> torch.Tensor:
        rows = self.weight_shape[0]
        counts = (self.crow_indices[1:] - self.crow_indices[:-1]).long()
        device = self.crow_indices.device
        row_of = torch.repeat_interleave(torch.arange(rows, device=device), counts)
        matrix = torch.zeros(rows, self._cols(), dtype=torch.bool, device=device)
        matrix[row_of, self.col_indices.long()] = True
        return matrix.reshape(self.weight_shape)

    def _cols(self) -> int:
        cols = 1
        for d in self.weight_shape[1:]:
            cols *= d
        return cols

    def _csr(self) -> torch.Tensor:
        with warnings.catch_warnings():  # "CSR support is in beta" on every construction
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices.to(torch.int32), self.values,
                                           size=(self.weight_shape[0], self._cols()), check_invariants=False)

    def dense_weight(self) -> torch.Tensor:
        """The ``weight_shape`` weight with zeros at pruned entries, rebuilt from the sparse storage."""
        if self.format == "bitmap":
            keep = self.mask()
            return torch.zeros(self.weight_shape, dtype=self.values.dtype, device=self.values.device).masked_scatter_(keep, self.values)
        return self._csr().to_dense().reshape(self.weight_shape)

    def kept(self) -> int:
        return self.values.numel()

    def density(self) -> float:
        return self.kept() / (self.weight_shape[0] * self._cols())

    def stored_weights(self) -> int:
        """Kept weights plus bias entries (used by `workbench.measure.count_params`)."""
        return self.kept() + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        return f"shape={self.weight_shape}, kept={self.kept()} ({self.density():.1%}), format={self.format}"


def masked_linear(weight: torch.Tensor, bias: torch.Tensor | None,
                  mask: torch.Tensor) -> tuple[nn.Linear, torch.Tensor]:
    """``(nn.Linear holding a copy of weight and bias, mask)``: the training view of a pruned linear layer.

    ``weight``: ``(out, in)`` with zeros at pruned entries; ``bias``: ``(out,)`` or None; ``mask``:
    bool ``(out, in)``, returned as given. The layer is float32 (PyTorch's default), on ``weight``'s device.
    """
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None).to(weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear, mask


class SparseLinear(_SparseWeight):
    """A pruned ``nn.Linear``: ``(…, in) -> (…, out)`` computed from the sparse storage."""

    def __init__(self, in_features: int, out_features: int, fmt: str = "bitmap"):
        super().__init__((out_features, in_features), fmt)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask: torch.Tensor, format: str = "auto",
                    name: str = "") -> "SparseLinear":
        """Keep ``linear.weight`` where ``mask`` (bool ``(out, in)``) is True; ``linear`` unchanged."""
        if not isinstance(linear, nn.Linear):
            raise UnsupportedLayerError(f"SparseLinear.from_linear needs nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features)
        layer._store(linear.weight, mask, linear.bias, format, name)
        return layer

    from_masked = from_linear

    def to_masked(self) -> tuple[nn.Linear, torch.Tensor]:
        """``(dense nn.Linear with zeros at pruned entries, bool mask (out, in))`` for fine-tuning."""
        return masked_linear(self.dense_weight(), self.bias, self.mask())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == "csr":
            flat = x.reshape(-1, self.in_features)
            out = torch.sparse.mm(self._csr(), flat.t()).t()
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dense_weight(), self.bias)


class SparseConv2d(_SparseWeight):
    """A pruned ``nn.Conv2d``; ``forward`` scatters the kept values into the kernel, then convolves."""

    def __init__(self, spec: ConvSpec, fmt: str = "bitmap"):
        super().__init__(spec.weight_shape, fmt)
        self.spec = spec

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mask: torch.Tensor, format: str = "auto",
                  name: str = "") -> "SparseConv2d":
        """Keep ``conv.weight`` where ``mask`` (bool, weight shape) is True; ``conv`` unchanged."""
        if not isinstance(conv, nn.Conv2d):
            raise UnsupportedLayerError(f"SparseConv2d.from_conv needs nn.Conv2d, got {type(conv).__name__}")
        layer = cls(ConvSpec.from_conv(conv))
        layer._store(conv.weight, mask, conv.bias, format, name)
        return layer

    from_masked = from_conv

    def to_masked(self) -> tuple[nn.Conv2d, torch.Tensor]:
        """``(dense nn.Conv2d with zeros at pruned entries, bool mask)`` for fine-tuning."""
        return self.spec.to_conv(self.dense_weight(), self.bias), self.mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.forward(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{self.spec.extra_repr()}, {super().extra_repr()}"


def sparse_from_layer(module: nn.Module, mask: torch.Tensor, format: str = "auto", name: str = "") -> nn.Module:
    """`SparseLinear` or `SparseConv2d` from a dense layer and its keep-mask."""
    if isinstance(module, nn.Linear):
        return SparseLinear.from_linear(module, mask, format, name)
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.from_conv(module, mask, format, name)
    raise UnsupportedLayerError(f"layer {name!r} of type {type(module).__name__} cannot be pruned; "
                                "pruning handles Linear and Conv2d")
