"""FLOP formulas for ops that ``torch.utils.flop_counter`` does not count on its own.

Registered once when `workbench.measure` is imported:
- ``aten.mkldnn_rnn_layer`` (``nn.LSTM``'s fused CPU kernel): the input and hidden matmuls,
  ``2 * tokens * (|W_ih| + |W_hh|)``, counted like the GRU's unfused matmuls.
- ``quantized.linear_dynamic`` (int8 weights, dynamic activations): ``2 * tokens * in * out``,
  the same multiply-adds as the float layer, done in int8.
- ``aten._sparse_addmm`` (a CSR-stored pruned Linear, `workbench.layers.sparse.SparseLinear`):
  ``2 * nnz * columns``, the multiply-adds of the kept weights only (the counter cannot see nnz
  from shapes, so this formula reads the sparse tensor itself).
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula


def _register(op, formula, get_raw: bool = False) -> None:
    if op is None or op in flop_registry or getattr(op, "default", None) in flop_registry:
        return
    register_flop_formula(op, get_raw=get_raw)(formula)


def _fused_rnn_flops(input_shape, w_ih_shape, w_hh_shape, *args, **kwargs) -> int:
    tokens = math.prod(input_shape[:-1])
    return 2 * tokens * (math.prod(w_ih_shape) + math.prod(w_hh_shape))


def _int8_linear_flops(input_shape, packed_weight, *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(input_shape[:-1])
    return 2 * tokens * input_shape[-1] * out_shape[-1]


def _sparse_addmm_flops(bias, sparse, dense, *args, out_val=None, **kwargs) -> int:
    nnz = sparse._nnz() if sparse.layout != torch.strided else int((sparse != 0).sum())
    return 2 * int(nnz) * dense.shape[-1]


def register_all() -> None:
    """Add the formulas above to the flop counter's registry (idempotent)."""
    _register(getattr(torch.ops.aten, "mkldnn_rnn_layer", None), _fused_rnn_flops)
    _register(getattr(torch.ops.aten, "_sparse_addmm", None), _sparse_addmm_flops, get_raw=True)
    try:
        _register(torch.ops.quantized.linear_dynamic, _int8_linear_flops)
    except (AttributeError, RuntimeError):  # a torch build without quantized CPU kernels
        pass


register_all()
