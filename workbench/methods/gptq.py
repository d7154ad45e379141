"""``gptq``: error-compensating post-training quantization of Linear layers (and transformers
Conv1D, through `workbench.adapters`) into `GroupQuantLinear` (packed codes + per-group scales).

Settings: ``bits`` (2..8), optional ``group_size`` (a divisor of the layer's input width; absent:
one grid per output channel), ``asymmetric`` (default True), ``damp`` (relative dampening of the
Gram diagonal, default 0.01), ``block_size`` (lazy-update block, default 128), ``awq``
(activation-aware input scaling first, default False), ``act_order`` (columns in descending order
of input energy, static groups; default False), ``sequential`` (build the plan's layers in forward
order, each on the inputs of the already-quantized model, `workbench.sequential`). The layer's
calibration inputs come from ``apply(..., calibration_inputs=...)``; their Gram ``X^T X`` is
the one activation-aware SVD uses (`workbench.kernels.aware.gram`, cached by content:
`workbench.svd_cache.cached_gram`). A saved model reloads through
`gptq_skeleton` (shapes only), with no calibration data. Conv2d is not handled (refused by type).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.kernels import gptq as gptq_kernels
from workbench.layers.grouped import GroupQuantLinear
from workbench.methods.quantization import _chosen, quantization_errors
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, check_options, register_method, register_recipe
from workbench.svd_cache import cached_gram

SETTINGS = ("bits", "group_size", "asymmetric", "damp", "block_size", "awq", "act_order", "sequential")


def check_gptq(module: nn.Module, params: Mapping[str, Any], name: str) -> None:
    """Refuse unknown settings, bits outside 2..8, a group size that does not divide the input width."""
    check_settings(params, module.in_features, name)


def check_settings(params: Mapping[str, Any], width: int, name: str) -> None:
    """`check_gptq` for a layer of ``width`` inputs."""
    check_options(f"method 'gptq' (layer {name!r})", params, SETTINGS)
    gptq_kernels.check_gptq_bits(params.get("bits"), name)
    gptq_kernels.check_group_size(params.get("group_size"), width, name)
    damp = params.get("damp", gptq_kernels.DEFAULT_DAMP)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp > 0:
        raise WorkbenchError(f"damp={damp!r} for layer {name!r} must be a number > 0")
    for flag in ("awq", "act_order", "sequential"):
        if not isinstance(params.get(flag, False), bool):
            raise WorkbenchError(f"{flag}={params[flag]!r} for layer {name!r} must be true or false")


def build_gptq(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """`GroupQuantLinear` whose codes GPTQ chose on ``context.inputs`` (``(..., in)``)."""
    check_gptq(module, params, context.name)
    if context.inputs is None:
        raise WorkbenchError(f"gptq for layer {context.name!r} needs calibration inputs; "
                             "pass calibration_inputs to workbench.apply")
    x = context.inputs  # the same tensor object each time: its Gram's cache key is hashed once
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    asymmetric = bool(params.get("asymmetric", True))
    quantize = gptq_kernels.awq_quantize if params.get("awq") else gptq_kernels.gptq_quantize
    codes, scale, zero, *input_scale = quantize(
        module.weight, cached_gram(x), params["bits"], params.get("group_size"), asymmetric,
        float(params.get("damp", gptq_kernels.DEFAULT_DAMP)),
        int(params.get("block_size", gptq_kernels.DEFAULT_BLOCK)), context.name,
        act_order=bool(params.get("act_order", False)))
    return GroupQuantLinear.from_codes(codes, scale, zero, module.bias, params["bits"], asymmetric, context.name,
                                       input_scale=input_scale[0] if input_scale else None)


def gptq_skeleton(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """The packed layer's structure only (weights to be loaded from a file): no data needed."""
    check_gptq(module, params, context.name)
    return GroupQuantLinear(module.in_features, module.out_features, params["bits"], params.get("group_size"),
                            module.bias is not None, bool(params.get("asymmetric", True)), context.name,
                            input_scaled=bool(params.get("awq")))


register_method(Method("gptq", build_gptq, (nn.Linear,), needs_inputs=True, skeleton=gptq_skeleton,
                       check=check_gptq,
                       description="b-bit weights (2..8) chosen column by column, compensating each "
                                   "column's error on the rest through the calibration Gram (GPTQ); "
                                   "codes bit-packed, per-channel or per-group scales"))


def gptq_plan(model: nn.Module, *, bits: int | None = None, group_size: int | None = None,
              asymmetric: bool | None = None, damp: float | None = None, awq: bool | None = None,
              act_order: bool | None = None, sequential: bool | None = None,
              layers: Sequence[str] | None = None) -> Plan:
    """GPTQ every Linear / transformers Conv1D (or ``layers``) to ``bits`` bits (2..8).

    ``group_size``: inputs per grid (must divide every chosen layer's input width); None: one
    grid per output channel. ``asymmetric``: zero-point grid (default True). ``damp``: relative
    dampening of the Gram diagonal (default 0.01). ``awq``: activation-aware input scaling
    before GPTQ (`workbench.kernels.gptq.awq_quantize`; five GPTQ runs a layer, ``2 * in`` bytes more).
    ``act_order``: columns in descending order of input energy (static groups; same storage).
    ``sequential``: each layer quantized on the inputs of the model whose earlier layers are
    already quantized (`workbench.sequential`).
    """
    if bits is None:
        raise WorkbenchError("gptq needs bits (2..8), e.g. --bits 4")
    gptq_kernels.check_gptq_bits(bits)
    names, dense = _chosen(model, layers, ("linear",), "gptq")
    if not names:
        raise WorkbenchError("gptq handles Linear layers (and transformers Conv1D) and this model has none")
    params: dict[str, Any] = {"bits": bits}
    if group_size is not None:
        params["group_size"] = group_size
    if asymmetric is not None:
        params["asymmetric"] = bool(asymmetric)
    if damp is not None:
        params["damp"] = damp
    for flag, value in (("awq", awq), ("act_order", act_order), ("sequential", sequential)):
        if value:
            params[flag] = True
    widths = {info.name: info.shape[1] for info in matrix_layers(model)}
    for name in names:  # every layer's settings checked before the plan is made
        check_settings(params, widths[name], name)
    return Plan({name: LayerPlan("gptq", params) for name in names}, left_dense=dense)


def gptq_report(original: nn.Module, compressed: nn.Module, task=None) -> dict:
    """CLI extras: per-layer weight and output errors on the calibration inputs."""
    inputs = task.calibration_inputs() if task is not None else None
    return {"layer_errors": quantization_errors(original, compressed, inputs) if inputs is not None else [],
            "notes": ["weight-only packed quantization: forward unpacks and dequantizes the codes, so it saves "
                      "bytes but is not faster"]}


register_recipe("gptq", gptq_plan, report=gptq_report)
