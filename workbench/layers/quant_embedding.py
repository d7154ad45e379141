"""`QuantEmbedding`: an embedding table stored as row-wise packed b-bit codes (2..8 bits), which
also serves as the LM head tied to that table.

State (``state_dict``, nothing else): ``packed`` uint8 ``(num_embeddings, ceil(dim * bits / 8))``,
``scale`` float16 ``(num_embeddings,)``, ``zero_point`` uint8 ``(num_embeddings,)``
(`workbench.kernels.row_quant`). Bytes: ``V * ceil(d * b / 8) + 3 V``.

``forward(x)`` dispatches on the input's dtype:

- integer ids ``(...,)`` -> ``(..., dim)``: the embedding lookup. Only the rows of the ids are
  unpacked and dequantized (the unique ids once), never the whole table;
- float activations ``(..., dim)`` -> ``(..., num_embeddings)``: the tied LM head ``x @ W_hat^T``,
  the whole table dequantized once per call.

So a tied group (embedding + bias-free head sharing one weight) is ONE such module at both names
(`workbench.ties.build_shared`), its codes stored once. ``padding_idx`` is kept (it only matters to
training in PyTorch; a zero padding row stays exactly zero on the grid); ``max_norm`` (which
rewrites the table's rows during forward) and ``nn.EmbeddingBag`` are refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import row_quant


class QuantEmbedding(nn.Module):
    """Embedding ``(num_embeddings, embedding_dim)`` as packed row-wise codes; see the module docstring."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, padding_idx: int | None = None,
                 name: str = ""):
        super().__init__()
        row_quant.check_row_bits(bits, name)
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, bits
        self.padding_idx = padding_idx
        self.register_buffer("packed", torch.zeros(num_embeddings, row_quant.row_bytes(embedding_dim, bits),
                                                   dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(num_embeddings, dtype=row_quant.SCALE_DTYPE))
        self.register_buffer("zero_point", torch.zeros(num_embeddings, dtype=row_quant.ZERO_DTYPE))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bits: int, padding_idx: int | None = None,
                    name: str = "") -> "QuantEmbedding":
        """Quantize a table ``weight: (num_embeddings, embedding_dim)`` (round to nearest, per row)."""
        layer = cls(weight.shape[0], weight.shape[1], bits, padding_idx, name)
        codes, scale, zero = row_quant.quantize_rows(weight, bits, name)
        layer.packed = row_quant.pack_rows(codes, bits)
        layer.scale, layer.zero_point = scale, zero
        return layer

    @classmethod
    def from_embedding(cls, embedding: nn.Module, bits: int, name: str = "") -> "QuantEmbedding":
        """From an ``nn.Embedding`` (left unchanged), or a bias-free ``nn.Linear`` LM head (its
        weight ``(vocab, dim)`` is the table); anything else is refused (`check_embedding`)."""
        check_embedding(embedding, name)
        padding_idx = embedding.padding_idx if isinstance(embedding, nn.Embedding) else None
        return cls.from_weight(embedding.weight, bits, padding_idx, name)

    from_float = from_embedding

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 codes of ``rows`` (1-D ids; None: all) ``(n, embedding_dim)``."""
        packed = self.packed if rows is None else self.packed[rows]
        return row_quant.unpack_rows(packed, self.bits, self.embedding_dim)

    def dequantized_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``(n, embedding_dim)``: the values the codes of ``rows`` (None: every row) stand for."""
        if rows is None:
            return row_quant.dequantize_rows(self.codes(), self.scale, self.zero_point)
        return row_quant.dequantize_rows(self.codes(rows), self.scale[rows], self.zero_point[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype.is_floating_point:  # the tied LM head: logits over the vocabulary
            return F.linear(x, self.dequantized_weight().to(x.dtype))
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise WorkbenchError(f"QuantEmbedding takes integer ids (lookup) or float activations (tied head); "
                                 f"got {x.dtype}")
        ids = x.reshape(-1).long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"ids must lie in [0, {self.num_embeddings}); got [{int(ids.min())}, {int(ids.max())}]")
        unique, where = torch.unique(ids, return_inverse=True)
        rows = self.dequantized_weight(unique)
        return F.embedding(where, rows).reshape(*x.shape, self.embedding_dim)

    def stored_weights(self) -> int:
        """Table entries (one code each), for `workbench.measure.count_params`."""
        return self.num_embeddings * self.embedding_dim

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{pad}, row-wise asymmetric"


def check_embedding(module: nn.Module, name: str = "") -> None:
    """Raise unless ``module`` is an ``nn.Embedding`` without ``max_norm`` or a bias-free ``nn.Linear``."""
    if isinstance(module, nn.Linear):
        if module.bias is not None:
            raise UnsupportedLayerError(f"layer {name!r}: quant_embedding takes an nn.Linear only as a bias-free "
                                        "LM head (its weight rows are the table); this one has a bias: use quant")
        return
    if not isinstance(module, nn.Embedding):
        raise UnsupportedLayerError(f"layer {name!r} of type {type(module).__name__} is not an nn.Embedding "
                                    "(or a bias-free LM head); quant_embedding cannot take it")
    if module.max_norm is not None:
        raise WorkbenchError(f"layer {name!r} has max_norm={module.max_norm}: nn.Embedding then rescales rows of "
                             "its table in place during forward, which packed codes cannot do; leave it dense")
