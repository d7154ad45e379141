"""Low rank and quantization together: methods and recipes ``svd_quant`` and ``svd_residual``.

* ``svd_quant`` (params ``rank``, ``bits`` 2..8, ``per_channel`` default True): the truncated SVD
  factors stored as packed ``bits``-bit codes (`workbench.layers.quant_lowrank.QuantLowRankLinear`).
* ``svd_residual`` (params ``rank``, ``bits`` 2..8, ``steps`` default 2): float32 factors plus the
  residual ``W - A B`` as packed ``bits``-bit codes per output row (`LowRankResidualLinear`).

Linear layers (and transformers Conv1D, through its adapter); Conv2d is refused. A setting whose
bytes (`workbench.kernels.quant_lowrank`) are not below the dense float32 weight's is refused by
``check``. The recipes take ``ratio``, a fraction of each layer's bytes, and pick the largest
rank whose layer fits in it.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from torch import nn

from workbench.errors import WorkbenchError
from workbench.inventory import get_submodule, matrix_layers
from workbench.kernels import quant_lowrank as qlr
from workbench.kernels import svd as svd_kernels
from workbench.layers.quant_lowrank import LowRankResidualLinear, QuantLowRankLinear
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, check_options, register_method, register_recipe

PARAMS = {"svd_quant": ("rank", "bits", "per_channel"), "svd_residual": ("rank", "bits", "steps")}


def weight_bytes(method: str, shape: tuple[int, int], params: Mapping[str, Any]) -> int:
    """Closed-form bytes of ``method``'s codes, scales and factors for a ``(out, in)`` weight (no bias)."""
    if method == "svd_quant":
        return qlr.svd_quant_bytes(shape, params["rank"], params["bits"], bool(params.get("per_channel", True)))
    return qlr.svd_residual_bytes(shape, params["rank"], params["bits"])


def _checker(method: str) -> Callable[[nn.Module, Mapping[str, Any], str], None]:
    def check(module: nn.Module, params: Mapping[str, Any], name: str) -> None:
        """Refuse unknown params, bits outside 2..8, a rank outside ``1..min(out, in)`` or one whose
        bytes are not below the dense weight's."""
        check_options(f"method {method!r} (layer {name!r})", params, PARAMS[method])
        if "bits" not in params or "rank" not in params:
            raise WorkbenchError(f"method {method!r} for layer {name!r} needs rank and bits; got {dict(params)}")
        qlr.check_bits(params["bits"], name, method)
        shape = tuple(module.weight.shape)
        svd_kernels.check_rank(params["rank"], shape, name)
        steps = params.get("steps", qlr.REFINE_STEPS)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise WorkbenchError(f"steps={steps!r} for layer {name!r} must be a whole number >= 0")
        size, dense = weight_bytes(method, shape, params), qlr.dense_bytes(shape)
        if size >= dense:
            limit = breakeven_rank(method, shape, params)
            raise WorkbenchError(
                f"rank={params['rank']} at bits={params['bits']} for layer {name!r} takes {size} bytes, not below "
                f"the dense weight's {dense}: {method} saves bytes up to rank {limit} here (shape {shape})")
    return check


def breakeven_rank(method: str, shape: tuple[int, int], params: Mapping[str, Any]) -> int:
    """Largest rank whose bytes are below the dense float32 weight's (0 if none)."""
    return qlr.largest_rank(shape, qlr.dense_bytes(shape) - 1,
                            lambda r: weight_bytes(method, shape, {**params, "rank": r}))


def build_svd_quant(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """`QuantLowRankLinear` from the (cached, when the engine has them) rank-``rank`` SVD factors."""
    check_svd_quant(module, params, context.name)
    rank = params["rank"]
    factors = context.factors(rank) if context.factors is not None else None
    return QuantLowRankLinear.from_linear(module, rank, params["bits"], bool(params.get("per_channel", True)),
                                          factors=factors, name=context.name)


def build_svd_residual(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """`LowRankResidualLinear` fitted from the (cached) rank-``rank`` SVD factors."""
    check_svd_residual(module, params, context.name)
    rank = params["rank"]
    factors = context.factors(rank) if context.factors is not None else None
    return LowRankResidualLinear.from_linear(module, rank, params["bits"], factors=factors,
                                             steps=params.get("steps", qlr.REFINE_STEPS), name=context.name)


def skeleton_svd_quant(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """The structure only (codes and scales to be loaded from a file)."""
    check_svd_quant(module, params, context.name)
    return QuantLowRankLinear(module.in_features, module.out_features, params["rank"], params["bits"],
                              bool(params.get("per_channel", True)), module.bias is not None)


def skeleton_svd_residual(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """The structure only (factors, codes and scales to be loaded from a file)."""
    check_svd_residual(module, params, context.name)
    return LowRankResidualLinear(module.in_features, module.out_features, params["rank"], params["bits"],
                                 module.bias is not None)


check_svd_quant, check_svd_residual = _checker("svd_quant"), _checker("svd_residual")

register_method(Method("svd_quant", build_svd_quant, (nn.Linear,), check=check_svd_quant,
                       skeleton=skeleton_svd_quant, factorized=True,
                       description="truncated SVD factors stored as packed b-bit codes (2..8 bits)"))
register_method(Method("svd_residual", build_svd_residual, (nn.Linear,), check=check_svd_residual,
                       skeleton=skeleton_svd_residual, factorized=True,
                       description="float32 low-rank factors plus the residual W - AB in packed b-bit codes"))


def _plan(method: str, model: nn.Module, ratio: float | None, bits: int | None, layers: Sequence[str] | None,
          extra: dict[str, Any]) -> Plan:
    """Per Linear layer (or ``layers``), the largest rank whose bytes are ``<= ratio`` of the dense
    layer's (bias counted on both sides) and below the dense weight's."""
    if ratio is None or bits is None:
        raise WorkbenchError(f"{method} needs ratio (fraction of each layer's bytes kept) and bits (2..8)")
    svd_kernels.check_fraction(ratio, "ratio")
    qlr.check_bits(bits, method=method)
    infos = {info.name: info for info in matrix_layers(model) if info.kind == "linear"}
    names = list(infos) if layers is None else list(layers)
    choices = {}
    for name in names:
        if name not in infos:
            module = get_submodule(model, name)
            raise WorkbenchError(f"layer {name!r} is a {type(module).__name__}; {method} compresses Linear layers: "
                                 f"{', '.join(infos) or '(none in this model)'}")
        shape = tuple(infos[name].shape)
        bias = 4 * shape[0] if getattr(get_submodule(model, name), "bias", None) is not None else 0
        params = {"bits": bits, **extra}
        budget = ratio * (qlr.dense_bytes(shape) + bias) - bias
        rank = min(qlr.largest_rank(shape, budget, lambda r: weight_bytes(method, shape, {**params, "rank": r})),
                   breakeven_rank(method, shape, params))
        if rank < 1:
            smallest = weight_bytes(method, shape, {**params, "rank": 1}) + bias
            raise WorkbenchError(
                f"ratio={ratio} is below what {method} at bits={bits} can reach for layer {name!r} (shape {shape}): "
                f"rank 1 takes {smallest} bytes, {smallest / (qlr.dense_bytes(shape) + bias):.4f} of its "
                f"{qlr.dense_bytes(shape) + bias} dense bytes")
        choices[name] = LayerPlan(method, {"rank": rank, **params})
    return Plan(choices)


def svd_quant_plan(model: nn.Module, *, ratio: float | None = None, bits: int | None = None,
                   per_channel: bool | None = None, layers: Sequence[str] | None = None) -> Plan:
    """Every Linear (or ``layers``) as quantized SVD factors, at the largest rank within ``ratio`` of its bytes.

    ``bits``: 2..8; ``per_channel``: one scale per factor row (default True) or one per factor.
    """
    extra = {} if per_channel is None or per_channel else {"per_channel": False}
    return _plan("svd_quant", model, ratio, bits, layers, extra)


def svd_residual_plan(model: nn.Module, *, ratio: float | None = None, bits: int | None = None,
                      layers: Sequence[str] | None = None) -> Plan:
    """Every Linear (or ``layers``) as float32 factors plus a ``bits``-bit residual, at the largest
    rank within ``ratio`` of its bytes (the residual codes alone take ``bits / 32`` of them)."""
    return _plan("svd_residual", model, ratio, bits, layers, {})


register_recipe("svd_quant", svd_quant_plan)
register_recipe("svd_residual", svd_residual_plan)
