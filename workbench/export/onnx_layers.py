"""Compact ONNX forms of the compressed layers: export twins, and the pass that packs their weights.

The exporters trace float modules, so each compressed layer is swapped (for export only) for a
*twin* built from its stored tensors, and the weights it dequantizes are packed back after export:

- packed b-bit codes (`QuantLinear` / `QuantConv2d` uniform, `GroupQuantLinear`, the factors of
  `QuantLowRankLinear`, the residual of `LowRankResidualLinear`): the float initializer becomes a
  ``DequantizeLinear`` of a UINT4 (``bits <= 4``) or UINT8 (``bits 5..8``) initializer, per tensor,
  per output channel (``axis=0``) or per group of inputs (``axis=1, block_size``; opset 21).
  onnxruntime 1.32 runs UINT4 ``DequantizeLinear`` on CPU, per axis and blocked; 2- and 3-bit
  codes are widened to 4 bits (5..7 to 8). The weights are dequantized exactly as PyTorch does.
- unstructured sparsity (`SparseLinear` / `SparseConv2d`): onnxruntime's CPU kernels have no
  compact sparse matmul, so the layer is stored once, dense, zeros included (never weight + mask);
  the file then equals the dense model's. Said in the notes.
- N:M semi-structured sparsity (`NMSparseLinear`): ONNX has no N:M tensor format and onnxruntime's
  CPU kernels no N:M matmul, so it is stored dense too (a plain ``MatMul`` weight, zeros included),
  with a note per layer.
- row-wise quantized embeddings (`QuantEmbedding`, a tied LM head too): ``DequantizeLinear`` per
  row, then ``Gather`` (or the head's ``MatMul``); a table shared by two names is stored once.
- low-rank GRU/LSTM (`LowRankRNN`): one ONNX ``GRU`` / ``LSTM`` node whose weights are the factor
  products computed in the graph; only the factors are stored.

``onnx_twin(module)`` returns a `Twin` (module, ``{parameter name: Packing}``, note) or None;
``pack_weights(model_proto, packings)`` rewrites the initializers; ``strip_debug_info`` drops the
per-node stack traces the dynamo exporter writes (often larger than the weights of a small model).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from workbench.kernels import quant as quant_kernels
from workbench.layers.grouped import GroupQuantLinear
from workbench.layers.nm import NMSparseLinear
from workbench.layers.quant_embedding import QuantEmbedding
from workbench.layers.quant_lowrank import LowRankResidualLinear, QuantLowRankLinear
from workbench.layers.quantized import QuantConv2d, QuantLinear
from workbench.layers.recurrent import LowRankRNN
from workbench.layers.sparse import SparseConv2d, SparseLinear

BLOCKED_OPSET = 21  # UINT4 and DequantizeLinear's block_size need opset 21


@dataclass(frozen=True)
class Packing:
    """How one float weight is stored: ``codes`` uint8 (weight shape, ``[0, 2^bits)``), ``scale``
    float32 and ``zero_point`` uint8 of equal shape (``()``, ``(out,)`` or ``(out, groups)``);
    ``value`` the float32 weight ``(codes - zero_point) * scale [/ divisor]`` the twin holds."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    value: np.ndarray
    axis: int | None = None
    block_size: int | None = None
    divisor: np.ndarray | None = None  # AWQ input scales (in,)

    @property
    def needs_opset21(self) -> bool:
        return self.bits <= 4 or self.block_size is not None


@dataclass
class Twin:
    """An export-only stand-in: ``module``, weights to pack ``{parameter name: Packing}``, a note."""

    module: nn.Module
    packings: dict[str, Packing] = field(default_factory=dict)
    note: str | None = None
    dense: bool = False  # stored dense in ONNX (unstructured sparsity)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias.detach())
    return layer


def _packing(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, value: torch.Tensor,
             group: int | None = None, divisor: torch.Tensor | None = None) -> Packing | None:
    """A `Packing` if the zero points are integers in ``[0, 2^bits)`` (DequantizeLinear needs that), else None."""
    if bits > 8:
        return None  # 16/32 "bits" are float passes: nothing to pack
    rows = codes.shape[0]
    per_tensor = scale.numel() == 1 and group is None
    scale = scale.detach().float().reshape(() if per_tensor else (rows, -1))
    zero = zero.detach().float().reshape(scale.shape)
    if not bool((zero == zero.round()).all()) or bool((zero < 0).any()) or bool((zero >= 2 ** bits).any()):
        return None
    if group is None and not per_tensor:
        scale, zero = scale.reshape(rows), zero.reshape(rows)
    axis = None if per_tensor else (1 if group is not None else 0)
    return Packing(codes.detach().to(torch.uint8).numpy(), scale.numpy().astype(np.float32),
                   zero.to(torch.uint8).numpy(), bits, value.detach().float().numpy(), axis, group,
                   None if divisor is None else divisor.detach().float().numpy())


class _LowRankTwin(nn.Module):
    """``second(first(x))`` (+ ``residual(x)`` first when given), as the quantized low-rank layers compute."""

    def __init__(self, first: nn.Linear, second: nn.Linear, residual: nn.Linear | None = None):
        super().__init__()
        self.first, self.second, self.residual = first, second, residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.second(self.first(x))
        return low if self.residual is None else self.residual(x) + low


class _RecurrentTwin(nn.Module):
    """`LowRankRNN` as one fused GRU/LSTM call on ``A B`` computed in the graph (ONNX ``GRU``/``LSTM`` node)."""

    def __init__(self, low: LowRankRNN):
        super().__init__()
        self.low = low

    def _weight(self, side: str) -> torch.Tensor:
        low = self.low
        dense = getattr(low, f"weight_{side}", None)
        if dense is not None:
            return dense
        b = getattr(low, f"b_{side}")
        return torch.bmm(getattr(low, f"a_{side}"), b).reshape(-1, b.shape[-1])

    def forward(self, x: torch.Tensor, hx=None):
        """As `LowRankRNN.forward`: ``x (n, T, in)`` / ``(T, n, in)`` / unbatched ``(T, in)``."""
        low = self.low
        weights = [self._weight("ih"), self._weight("hh")]
        if low.bias_ih is not None:
            weights += [low.bias_ih, low.bias_hh]
        unbatched = x.dim() == 2
        batch_first = low.batch_first and not unbatched
        if unbatched:
            x = x.unsqueeze(1)  # (T, 1, in)
            hx = None if hx is None else (hx.unsqueeze(1) if low.kind == "GRU" else tuple(s.unsqueeze(1) for s in hx))
        zeros = x.new_zeros(1, x.shape[0 if batch_first else 1], low.hidden_size)
        args = (low.bias_ih is not None, 1, 0.0, False, False, batch_first)
        if low.kind == "GRU":
            out, h = torch._VF.gru(x, zeros if hx is None else hx, weights, *args)
            return (out[:, 0], h[:, 0]) if unbatched else (out, h)
        out, h, c = torch._VF.lstm(x, (zeros, zeros) if hx is None else hx, weights, *args)
        return (out[:, 0], (h[:, 0], c[:, 0])) if unbatched else (out, (h, c))


class _EmbeddingTwin(nn.Module):
    """`QuantEmbedding` on its dequantized table ``weight: (V, d)``: ids -> lookup, floats -> tied head."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype.is_floating_point:
            return torch.nn.functional.linear(x, self.weight.to(x.dtype))
        return torch.nn.functional.embedding(x, self.weight)


def _embedding_twin(module: QuantEmbedding) -> Twin:
    twin = _EmbeddingTwin(module.dequantized_weight())
    return Twin(twin, {"weight": _packing(module.codes(), module.scale, module.zero_point, module.bits, twin.weight)})


def _quant_twin(module: QuantLinear | QuantConv2d) -> Twin:
    plain = module.to_float()
    if module.scheme != "uniform":
        return Twin(plain, note="k-means codebook weights are stored as float32 in ONNX")
    packing = _packing(module.codes(), module.scale, module.zero_point, module.bits, plain.weight)
    if packing is None:
        return Twin(plain, note=f"{module.bits}-bit codes (zero point {float(module.zero_point.reshape(-1)[0]):g}) "
                    "are stored as float32 in ONNX: DequantizeLinear needs integer zero points and <= 8 bits")
    return Twin(plain, {"weight": packing})


def _group_twin(module: GroupQuantLinear) -> Twin:
    plain = module.to_float()
    group = module.group_size if module.groups > 1 else None
    packing = _packing(module.codes(), module.scale, module.zero_point, module.bits, plain.weight, group,
                       module.input_scale)
    return Twin(plain, {"weight": packing})


def _row_codes(packed: torch.Tensor, scale: torch.Tensor, bits: int, shape: tuple[int, int],
               value: torch.Tensor) -> Packing:
    """Symmetric row codes of `workbench.kernels.quant_lowrank` (zero point ``2^(bits-1)``)."""
    codes = quant_kernels.unpack_codes(packed, bits, shape[0] * shape[1]).reshape(shape)
    zero = torch.full_like(scale.float(), float(2 ** (bits - 1)))
    return _packing(codes, scale, zero, bits, value)


def _quant_lowrank_twin(module: QuantLowRankLinear) -> Twin:
    first = _linear(module.first_weight(), None)
    second = _linear(module.second_weight(), module.bias)
    return Twin(_LowRankTwin(first, second), {
        "first.weight": _row_codes(module.first_packed, module.first_scale, module.bits,
                                   (module.rank, module.in_features), first.weight),
        "second.weight": _row_codes(module.second_packed, module.second_scale, module.bits,
                                    (module.out_features, module.rank), second.weight)})


def _residual_twin(module: LowRankResidualLinear) -> Twin:
    residual = _linear(module.residual_weight(), module.bias)
    twin = _LowRankTwin(_linear(module.first.detach(), None), _linear(module.second.detach(), None), residual)
    return Twin(twin, {"residual.weight": _row_codes(module.residual_packed, module.residual_scale, module.bits,
                                                     (module.out_features, module.in_features), residual.weight)})


def onnx_twin(module: nn.Module) -> Twin | None:
    """The export-only stand-in of a compressed layer, or None when ``module`` exports as it is."""
    if isinstance(module, (SparseLinear, SparseConv2d)):
        return Twin(module.to_masked()[0], dense=True)
    if isinstance(module, NMSparseLinear):
        return Twin(module.to_masked()[0], note=f"{module.n}:{module.m} sparsity is stored dense in ONNX (no N:M format "
                                                "or CPU kernel exists there): as large as the dense layer")
    if isinstance(module, (QuantLinear, QuantConv2d)):
        return _quant_twin(module)
    if isinstance(module, GroupQuantLinear):
        return _group_twin(module)
    if isinstance(module, QuantLowRankLinear):
        return _quant_lowrank_twin(module)
    if isinstance(module, LowRankResidualLinear):
        return _residual_twin(module)
    if isinstance(module, QuantEmbedding):
        return _embedding_twin(module)
    if isinstance(module, LowRankRNN) and not module.fused_input:
        return Twin(_RecurrentTwin(module))
    return None


def strip_debug_info(model_proto) -> None:
    """Drop per-node stack traces / doc strings and intermediate ``value_info`` (shapes onnxruntime infers)."""
    for node in model_proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model_proto.graph.value_info[:]


def _find_initializer(graph, name: str, value: np.ndarray):
    """The float initializer named ``name``, else the one holding exactly ``value``; None if neither."""
    import onnx.numpy_helper  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    by_name = [i for i in graph.initializer if i.name == name]
    if by_name:
        return by_name[0]
    for init in graph.initializer:
        if tuple(init.dims) == value.shape and init.data_type == 1:
            if np.array_equal(onnx.numpy_helper.to_array(init), value):
                return init
    return None


def _raw_tensor(name: str, values: np.ndarray, wide: bool):
    """A UINT8 (``wide``) or UINT4 initializer holding ``values`` as raw bytes (UINT4: two per byte, low nibble first)."""
    from onnx import TensorProto, helper  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    flat = values.astype(np.uint8).reshape(-1)
    if not wide:
        flat = np.concatenate([flat, np.zeros(flat.size % 2, np.uint8)])
        flat = (flat[0::2] & 0xF) | (flat[1::2] << 4)
    kind = TensorProto.UINT8 if wide else TensorProto.UINT4
    return helper.make_tensor(name, kind, values.shape, flat.tobytes(), raw=True)


def pack_weights(model_proto, packings: dict[str, Packing]) -> list[str]:
    """Replace each packed weight's float initializer by ``DequantizeLinear(codes, scale, zero_point)``.

    ``packings``: ``{qualified parameter name: Packing}``. Returns the names that were not found in
    the graph (left float). Raises the opset to 21 (version converter) when UINT4 or blocks are used.
    """
    import onnx  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model_proto.graph
    missing, nodes = [], []
    for name, packing in packings.items():
        init = _find_initializer(graph, name, packing.value)
        if init is None:
            missing.append(name)
            continue
        target, prefix = init.name, init.name.replace(".", "_")
        graph.initializer.remove(init)
        wide = packing.bits > 4
        graph.initializer.extend([
            _raw_tensor(f"{prefix}_codes", packing.codes, wide),
            numpy_helper.from_array(packing.scale, f"{prefix}_scale"),
            _raw_tensor(f"{prefix}_zero_point", packing.zero_point, wide)])
        attrs = {} if packing.axis is None else {"axis": packing.axis}
        if packing.block_size is not None:
            attrs["block_size"] = packing.block_size
        out = target if packing.divisor is None else f"{prefix}_scaled"
        nodes.append(helper.make_node("DequantizeLinear", [f"{prefix}_codes", f"{prefix}_scale", f"{prefix}_zero_point"],
                                      [out], name=f"{prefix}_dequantize", **attrs))
        if packing.divisor is not None:
            graph.initializer.append(numpy_helper.from_array(packing.divisor, f"{prefix}_input_scale"))
            nodes.append(helper.make_node("Div", [out, f"{prefix}_input_scale"], [target], name=f"{prefix}_awq"))
    for position, node in enumerate(nodes):
        graph.node.insert(position, node)
    opset = next((o for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset.version < BLOCKED_OPSET and any(p.needs_opset21 for p in packings.values()):
        opset.version = BLOCKED_OPSET  # 19..21 add types and attributes; float32 semantics unchanged
    if model_proto.ir_version < 10:
        model_proto.ir_version = 10  # UINT4 needs IR 10
    onnx.checker.check_model(model_proto)
    return missing
