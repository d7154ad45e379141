"""Quantization methods: "quant" (packed b-bit weights, uniform or k-means) and "int8" (int8
weights + dynamic int8 activations, faster on CPU); recipes of the same names.

``bits`` 16 or 32 mean "no quantization" (the layer is left as it is); anything else outside
1..8 is refused. A uniform grid's range follows the ``clip`` setting ("max", "mse",
"percentile"; `workbench.kernels.quant.quantize_uniform`); a plan without one gets
`workbench.kernels.quant.default_clip` (``"mse"`` up to 4 bits, ``"max"`` above).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from workbench.adapters import canonical
from workbench.hooks import collect_layer_inputs
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import get_submodule, matrix_layers
from workbench.kernels import quant as quant_kernels
from workbench.layers.grouped import GroupQuantLinear
from workbench.layers.quantized import Int8Linear, QuantConv2d, QuantLinear, quantized_from_layer
from workbench.measure import latency_ms
from workbench.methods.quant_embedding import embedding_entries
from workbench.methods.units import unit_names, unit_of, unit_table
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, register_method, register_recipe


def build_quant(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """`QuantLinear` / `QuantConv2d` with packed codes; ``bits`` 16/32 returns ``module`` unchanged."""
    bits = quant_kernels.check_bits(params.get("bits"), context.name, allow_no_op=True)
    if bits in quant_kernels.NO_OP_BITS:
        return module
    scheme = quant_kernels.check_scheme(params.get("scheme", "uniform"))
    if scheme != "uniform" and "clip" in params:
        raise WorkbenchError(f"layer {context.name!r}: clip={params['clip']!r} applies to the uniform scheme; "
                             f"{scheme} codebooks have no range to clip")
    clip = quant_kernels.check_clip(params.get("clip", quant_kernels.default_clip(bits)), context.name)
    return quantized_from_layer(module, bits, scheme,
                                bool(params.get("per_channel", False)), bool(params.get("asymmetric", False)),
                                int(params.get("seed", 0)), context.name, clip)


def build_int8(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    return Int8Linear.from_linear(module, context.name)


register_method(Method("quant", build_quant, (nn.Linear, nn.Conv2d),
                       description="b-bit weights (uniform or k-means codebook), codes bit-packed"))
register_method(Method("int8", build_int8, (nn.Linear,),
                       description="int8 weights per channel + dynamic int8 activations (CPU kernels)"))


def _chosen(model: nn.Module, layers: Sequence[str] | None, kinds: tuple[str, ...], what: str
            ) -> tuple[list[str], dict[tuple[str, ...], str]]:
    """``(names, left_dense)``: ``layers`` (checked), or every matrix layer of ``kinds`` ("linear":
    Linear and transformers Conv1D; "conv": Conv2d), a tied group with all its members (naming one
    names the group); tied groups it cannot take, with the reason (the plan's ``left_dense``)."""
    units, dense = unit_table(model, kinds=kinds)
    if layers is None:
        return [name for names, _ in units.values() for name in names], dense
    keys = []
    for name in layers:
        module = get_submodule(model, name)
        key = unit_of(units, dense, name)
        if key is None:
            raise UnsupportedLayerError(f"layer {name!r} of type {type(module).__name__} cannot take {what}; "
                                        f"it handles: {unit_names(units) or '(none in this model)'}")
        keys.append(key)
    return [name for key in dict.fromkeys(keys) for name in units[key][0]], dense


def quant_plan(model: nn.Module, *, bits: int | None = None, scheme: str | None = None,
               per_channel: bool | None = None, asymmetric: bool | None = None,
               layers: Sequence[str] | None = None, seed: int = 0, include_embeddings: bool = False,
               clip: str | None = None) -> Plan:
    """Quantize every Linear/Conv2d (or ``layers``) to ``bits`` bits.

    ``scheme``: "uniform" (default; symmetric unless ``asymmetric``) or "kmeans" (codebook of
    ``2^bits`` centroids); ``per_channel``: one scale (or codebook) per output channel.
    ``clip`` (uniform): how the grid's range is chosen, "max" (largest weight), "mse" (least
    squared rounding error) or "percentile" (99.9th of ``|w|``); stored in the plan when given,
    else the builder's default applies (`workbench.kernels.quant.default_clip`: "mse" up to 4
    bits, "max" above). Binarization (symmetric 1 bit) is the same under every clip.
    ``bits`` 16/32 give an empty plan (float weights kept). A tied group gets one choice on every
    member (its codes packed once). ``include_embeddings``: the embedding tables too (and an LM
    head tied to one), as row-wise ``bits``-bit codes (`workbench.methods.quant_embedding`, 2..8 bits).
    """
    if bits is None:
        raise WorkbenchError("quant needs bits (1..8; 16/32 mean no quantization)")
    quant_kernels.check_bits(bits, allow_no_op=True)
    scheme = quant_kernels.check_scheme(scheme or "uniform")
    if scheme == "kmeans" and asymmetric:
        raise WorkbenchError("asymmetric applies to the uniform scheme; k-means codebooks have no zero point")
    if clip is not None:
        quant_kernels.check_clip(clip)
        if scheme != "uniform":
            raise WorkbenchError(f"clip={clip!r} applies to the uniform scheme; k-means codebooks have no range to clip")
    names, dense = _chosen(model, layers, ("linear", "conv"), "quant")
    if bits in quant_kernels.NO_OP_BITS:
        return Plan({})
    params = {"bits": bits, "scheme": scheme}
    if per_channel:
        params["per_channel"] = True
    if asymmetric:
        params["asymmetric"] = True
    if scheme == "kmeans":
        params["seed"] = seed
    if clip is not None:
        params["clip"] = clip
    entries = {name: LayerPlan("quant", params) for name in names}
    if include_embeddings:
        if bits == 1:
            raise WorkbenchError("include_embeddings needs bits from 2 to 8 (row-wise tables); got bits=1")
        tables, held = embedding_entries(model, bits)
        dense = {group: reason for group, reason in dense.items() if not set(group) & set(tables)} | held
        entries.update(tables)
    return Plan(entries, left_dense=dense)


def int8_plan(model: nn.Module, *, layers: Sequence[str] | None = None) -> Plan:
    """int8 (weights per channel, activations dynamic) for every Linear layer (or ``layers``)."""
    names, dense = _chosen(model, layers, ("linear",), "int8")
    if not names:
        raise WorkbenchError("int8 handles Linear layers and this model has none")
    return Plan({name: LayerPlan("int8", {}) for name in names}, left_dense=dense)


# ------------------------------------------------------------------ error figures
@torch.no_grad()
def quantization_errors(original: nn.Module, compressed: nn.Module, inputs: torch.Tensor) -> list[dict]:
    """Per quantized layer: weight MSE and relative output error on cached inputs.

    ``inputs``: model inputs; each layer's own inputs are collected from ``original`` and both
    the original and the quantized layer run on them. Returns
    ``[{"name", "bits", "weight_mse", "output_rel_error"}]`` (``||y_q - y|| / ||y||``).
    """
    names = [name for name, m in compressed.named_modules()
             if isinstance(m, (QuantLinear, QuantConv2d, Int8Linear, GroupQuantLinear))]
    if not names:
        return []
    cached = collect_layer_inputs(original, names, inputs)
    rows = []
    for name in names:
        before, after = original.get_submodule(name), compressed.get_submodule(name)
        x = cached[name]
        y, y_q = before(x), after(x)
        rows.append({"name": name, "bits": getattr(after, "bits", 8),
                     "weight_mse": quant_kernels.weight_mse(canonical(before).weight, after.dequantized_weight()),
                     "output_rel_error": float((y_q - y).norm() / y.norm().clamp_min(1e-12))})
    return rows


def quant_report(original: nn.Module, compressed: nn.Module, task=None) -> dict:
    """CLI extras: per-layer error figures and a note on speed."""
    inputs = task.calibration_inputs() if task is not None else None
    errors = quantization_errors(original, compressed, inputs) if inputs is not None else []
    return {"layer_errors": errors,
            "notes": ["weight-only packed quantization: forward unpacks and dequantizes the codes, so it saves "
                      "bytes but is not faster; use --method int8 for CPU speed"]}




def int8_report(original: nn.Module, compressed: nn.Module, task=None) -> dict:
    """CLI extras: error figures and fp32 vs int8 latency at batch 256 (the measures give batch 1)."""
    report = quant_report(original, compressed, task)
    notes = []
    if task is not None:
        x = task.eval_inputs[:256]
        fp32, int8 = latency_ms(original, x, 30, warmup=3), latency_ms(compressed, x, 30, warmup=3)
        report["latency_batch"] = {"batch": len(x), "fp32_ms": round(fp32, 4), "int8_ms": round(int8, 4),
                                   "speedup": round(fp32 / int8, 3)}
        notes.append(f"batch {len(x)}: fp32 {fp32:.3f} ms, int8 {int8:.3f} ms ({fp32 / int8:.2f}x); small "
                     "layers gain little because activation quantization has a fixed cost")
    convs = [info.name for info in matrix_layers(original) if info.kind == "conv"]
    if convs:
        notes.append(f"conv layers {convs} stay float32 under int8 (dynamic int8 kernels handle Linear); "
                     "use --method quant --bits 8 to store them in 8 bits")
    report["notes"] = notes
    return report


def qat_plan(model: nn.Module, *, bits: int | None = None, scheme: str | None = None,
             asymmetric: bool | None = None, per_channel: bool | None = None,
             layers: Sequence[str] | None = None, clip: str | None = None) -> Plan:
    """The PTQ starting point of QAT: the ``quant`` plan (symmetric uniform ``bits``-bit codes, 2..8;
    ``clip`` picks the starting grid's range as in `quant_plan`).

    The plan gives the packed structure (so a saved QAT model loads back through its plan); the
    training itself happens after `workbench.apply`, in `workbench.recovery.qat` (the CLI does it
    for ``--method qat``).
    """
    if bits is None:
        raise WorkbenchError("qat needs bits (2..8), e.g. --bits 4")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise WorkbenchError(f"bits={bits!r} must be an integer from 2 to 8")
    if (scheme not in (None, "uniform")) or asymmetric:
        raise WorkbenchError(f"qat learns the steps of the symmetric uniform grid; scheme={scheme!r}, "
                             f"asymmetric={bool(asymmetric)} are not supported")
    return quant_plan(model, bits=bits, per_channel=per_channel, layers=layers, clip=clip)


register_recipe("quant", quant_plan, report=quant_report)
register_recipe("int8", int8_plan, report=int8_report)
register_recipe("qat", qat_plan)
