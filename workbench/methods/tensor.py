"""Tensor decompositions of Conv2d layers ("tucker", "cp", "spatial-svd") and BatchNorm folding.

Layer methods and their settings::

    LayerPlan("tucker", {"rank_out": 16, "rank_in": 8})
    LayerPlan("cp", {"rank": 40})
    LayerPlan("spatial-svd", {"rank": 12})

Recipes of the same names build a plan for every ungrouped Conv2d (or ``layers``) from exactly one
rule: ``ratio`` (kept fraction of each conv's weights), ``ranks`` (``{layer: rank}``; for Tucker an
int sets both modes, capped at each mode's size, or a pair ``(rank_out, rank_in)``), ``energy``
(Tucker: per channel mode, the rank keeping that fraction of the unfolding's sigma^2) or
``estimate="vbmf"`` (Tucker: VBMF on each channel unfolding). A conv whose chosen ranks would not
save weights is left dense. Grouped/depthwise convs are left dense (the reason is in the error).

The ``fold_bn`` step folds every BatchNorm2d (BatchNorm1d) whose input is the output of a Conv2d
(Linear) into that layer (inference-time exact: uses the running statistics), wherever the pair
sits: in an ``nn.Sequential`` or called from a module's own ``forward`` (a residual block), as
`torch.fx` traces the model. A BatchNorm is left in place when its input is not a lone layer
output (after an add or an activation; the layer's output also used elsewhere; the layer or the
BatchNorm called more than once) or it has no running statistics; `bn_fold_analysis` says which and
why. A model torch.fx cannot trace falls back to neighbours inside an ``nn.Sequential``.
"""
from __future__ import annotations

import copy
import functools
import math
from collections import Counter
from typing import Any, Mapping

import torch
from torch import fx, nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import get_submodule, set_submodule
from workbench.kernels import svd as svd_kernels
from workbench.kernels import tensor as tk
from workbench.layers.tensor import CPConv2d, SpatialSVDConv2d, TuckerConv2d, check_conv
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, register_method, register_recipe

TENSOR_METHODS = ("tucker", "cp", "spatial-svd")


# --------------------------------------------------------------------------- layer methods
def build_tucker(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    ranks = (params.get("rank_out"), params.get("rank_in"))
    return TuckerConv2d.from_conv(module, ranks, name=context.name)


def build_cp(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    return CPConv2d.from_conv(module, params.get("rank"), name=context.name)


def build_spatial(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    return SpatialSVDConv2d.from_conv(module, params.get("rank"), name=context.name)


def tucker_skeleton(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    check_conv(module, context.name)
    return TuckerConv2d(module, params["rank_out"], params["rank_in"])


def cp_skeleton(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    check_conv(module, context.name)
    return CPConv2d(module, params["rank"])


def spatial_skeleton(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    check_conv(module, context.name)
    return SpatialSVDConv2d(module, params["rank"])


register_method(Method("tucker", build_tucker, (nn.Conv2d,), skeleton=tucker_skeleton,
                       description="Tucker-2: 1x1 -> k x k core -> 1x1 (ranks rank_out, rank_in)"))
register_method(Method("cp", build_cp, (nn.Conv2d,), skeleton=cp_skeleton,
                       description="CP: 1x1 -> k x 1 depthwise -> 1 x k depthwise -> 1x1 (rank)"))
register_method(Method("spatial-svd", build_spatial, (nn.Conv2d,), skeleton=spatial_skeleton,
                       description="spatial SVD: k x 1 conv then 1 x k conv (rank)"))


def layer_params(method: str, shape: tuple[int, ...], settings: Mapping[str, Any]) -> int:
    """Weights (no bias) of ``method`` with ``settings`` on a kernel of ``shape``."""
    if method == "tucker":
        return tk.tucker_params(shape, (settings["rank_out"], settings["rank_in"]))
    if method == "cp":
        return tk.cp_params(shape, settings["rank"])
    return tk.spatial_params(shape, settings["rank"])


# --------------------------------------------------------------------------- recipes
def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """``{name: conv}`` of every ungrouped Conv2d (the ones these methods can decompose)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}


def _settings_for_rank(method: str, shape: tuple[int, ...], rank: Any, name: str) -> dict:
    if method == "tucker":
        if isinstance(rank, (tuple, list)):
            r_out, r_in = tk.check_tucker_ranks(shape, tuple(rank), name)
        else:  # one int: the rank of both channel modes
            where = f" for layer {name!r}" if name else ""
            tk.check_int_rank(rank, "rank", min(shape[0], shape[1]),
                              f"the smaller channel mode (out {shape[0]}, in {shape[1]}; give a pair "
                              f"(rank_out, rank_in) for different ranks, CLI LAYER=OUTxIN)", where)
            r_out, r_in = rank, rank
        return {"rank_out": r_out, "rank_in": r_in}
    if method == "cp":
        return {"rank": tk.check_cp_rank(shape, rank, name)}
    return {"rank": tk.check_spatial_rank(shape, rank, name)}


def _settings_for_rule(method: str, conv: nn.Conv2d, ratio, energy, estimate) -> dict:
    shape = tuple(conv.weight.shape)
    w = conv.weight.detach()
    if method == "tucker":
        if ratio is not None:
            r_out, r_in = tk.tucker_ranks_for_ratio(shape, ratio)
        elif energy is not None:
            r_out, r_in = tk.tucker_ranks_for_energy(w, energy)
        else:
            r_out, r_in = tk.tucker_ranks_vbmf(w)
        return {"rank_out": r_out, "rank_in": r_in}
    if ratio is None:
        raise WorkbenchError(f"{method} chooses its rank from ratio or ranks; energy/estimate are "
                             f"Tucker rules (got energy={energy!r}, estimate={estimate!r})")
    if method == "cp":
        return {"rank": tk.cp_rank_for_ratio(shape, ratio)}
    return {"rank": tk.spatial_rank_for_ratio(shape, ratio)}


def tensor_plan(method: str, model: nn.Module, *, ratio: float | None = None,
                energy: float | None = None, ranks: Mapping[str, Any] | None = None,
                estimate: str | None = None, layers: list[str] | None = None) -> Plan:
    """A plan decomposing convs with ``method`` ("tucker", "cp" or "spatial-svd"); see module doc."""
    if method not in TENSOR_METHODS:
        raise WorkbenchError(f"method={method!r} must be one of {TENSOR_METHODS}")
    if estimate is not None and estimate != "vbmf":
        raise WorkbenchError(f"estimate={estimate!r}: the only estimate offered is 'vbmf'")
    given = [k for k, v in (("ratio", ratio), ("energy", energy), ("ranks", ranks), ("estimate", estimate))
             if v is not None]
    if len(given) != 1:
        raise WorkbenchError(f"{method} needs exactly one of ratio, energy, ranks or estimate; got "
                             f"{given or 'none'}")
    if ratio is not None:
        svd_kernels.check_fraction(ratio, "ratio")
    if energy is not None:
        svd_kernels.check_fraction(energy, "energy")
    convs = conv_layers(model)
    chosen = dict(ranks) if ranks is not None else {name: None for name in (layers or list(convs))}
    choices: dict[str, LayerPlan] = {}
    for name, rank in chosen.items():
        module = get_submodule(model, name)
        if name not in convs:
            check_conv(module, name, method)  # raises with the reason (not a conv / grouped)
        conv = convs[name]
        shape = tuple(conv.weight.shape)
        settings = (_settings_for_rank(method, shape, rank, name) if ranks is not None
                    else _settings_for_rule(method, conv, ratio, energy, estimate))
        if layer_params(method, shape, settings) < math.prod(shape):
            choices[name] = LayerPlan(method, settings)
    return Plan(choices)


for _method in TENSOR_METHODS:
    register_recipe(_method, functools.partial(tensor_plan, _method))


# --------------------------------------------------------------------------- BatchNorm folding
def fold_bn_into(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` (Conv2d or Linear) with ``bn`` (eval-mode BatchNorm after it) folded in.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel,
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``. Exact for the running statistics.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise WorkbenchError("BatchNorm with track_running_stats=False has no running statistics to fold")
    out = layer.weight.shape[0]
    if bn.num_features != out:
        raise WorkbenchError(f"BatchNorm has {bn.num_features} features but the layer before has {out} outputs")
    fused = copy.deepcopy(layer)
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        if layer.bias is not None:
            shift = shift + layer.bias.double() * scale
        fused.weight.copy_((layer.weight.double() * scale.view(-1, *([1] * (layer.weight.dim() - 1))))
                           .to(layer.weight.dtype))
        fused.bias = nn.Parameter(shift.to(layer.weight.dtype))
    return fused


_FOLDABLE = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def _foldable_types(layer: nn.Module, bn: nn.Module) -> bool:
    return any(isinstance(layer, la) and type(bn) is lb for la, lb in _FOLDABLE)


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``[(layer name, bn name)]``: foldable neighbours inside an nn.Sequential (no tracing)."""
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if _foldable_types(a, b):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + name_a, prefix + name_b))
    return pairs


def _describe(model: nn.Module, node: Any) -> str:
    """What an fx graph node computes, in words (``"the output of ReLU 'act'"``, ``"add()"``)."""
    if not isinstance(node, fx.Node):
        return f"the constant {node!r}"
    if node.op == "call_module":
        return f"the output of {type(model.get_submodule(node.target)).__name__} {node.target!r}"
    if node.op == "placeholder":
        return f"the model's input {node.target!r}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"the result of .{name}()" if node.op == "call_method" else f"the result of {name}()"


def _traced_pairs(model: nn.Module, bns: dict[str, None]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """`bn_fold_analysis` from the torch.fx graph of ``model`` (raises if it cannot be traced)."""
    graph = fx.symbolic_trace(model).graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs, left, seen = [], {}, set()
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in bns or node.target in seen:
            continue
        seen.add(node.target)
        bn, source = model.get_submodule(node.target), node.args[0] if node.args else None
        layer = model.get_submodule(source.target) if getattr(source, "op", None) == "call_module" else None
        if calls[node.target] > 1:
            left[node.target] = f"called {calls[node.target]} times in forward"
        elif len(node.args) != 1 or node.kwargs or layer is None or not _foldable_types(layer, bn):
            left[node.target] = (f"its input is {_describe(model, source)}, not the output of a Conv2d "
                                 "(a Linear for BatchNorm1d)")
        elif calls[source.target] > 1:
            left[node.target] = f"{source.target!r} before it is called {calls[source.target]} times in forward"
        elif len(source.users) > 1:
            left[node.target] = f"the output of {source.target!r} is also used elsewhere ({len(source.users)} users)"
        elif bn.running_mean is None or bn.running_var is None:
            left[node.target] = "no running statistics (track_running_stats=False)"
        else:
            pairs.append((source.target, node.target))
    left.update({name: "never called in forward" for name in bns if name not in seen})
    return pairs, left


def bn_fold_analysis(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(pairs, left)``: ``pairs`` ``[(layer name, bn name)]`` that `build_fold_bn` folds, in graph
    order; ``left`` ``{bn name: why it stays}`` for every other BatchNorm of ``model``.

    The pairs come from the torch.fx graph (a BatchNorm whose only input is the output of a
    Conv2d/Linear used nowhere else, each called once); when torch.fx cannot trace ``model``,
    from neighbours inside an ``nn.Sequential``, and ``left`` says so. ``model`` is not modified.
    """
    bns = {name: None for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not bns:
        return [], {}
    try:
        return _traced_pairs(model, bns)
    except Exception as error:  # any tracing failure (data-dependent control flow, custom ops): no graph
        pairs = [(a, b) for a, b in _sequential_pairs(model)
                 if model.get_submodule(b).running_mean is not None]
        folded = {b for _, b in pairs}
        reason = (f"torch.fx could not trace the model ({type(error).__name__}); only BatchNorms right after "
                  "their layer inside an nn.Sequential are folded")
        return pairs, {name: reason for name in bns if name not in folded}


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``[(layer name, bn name)]``: the BatchNorms `build_fold_bn` folds (`bn_fold_analysis`)."""
    return bn_fold_analysis(model)[0]


def build_fold_bn(model: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """Whole-model step: fold each BatchNorm of `foldable_pairs` into its layer, BN -> Identity.

    ``model`` is the copy made by `workbench.apply`; it is changed and returned.
    """
    for layer_name, bn_name in foldable_pairs(model):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        set_submodule(model, layer_name, fold_bn_into(layer, bn))
        set_submodule(model, bn_name, nn.Identity())
    return model


register_method(Method("fold_bn", build_fold_bn, (nn.Module,), kind="step",
                       description="fold BatchNorm into the preceding Conv2d/Linear (exact at inference)"))


def fold_bn_plan(model: nn.Module) -> Plan:
    """The plan with the single step ``fold_bn``."""
    pairs, left = bn_fold_analysis(model)
    if not pairs:
        why = "; ".join(f"{bn!r}: {reason}" for bn, reason in left.items()) or "the model has no BatchNorm"
        raise UnsupportedLayerError(f"no BatchNorm takes the lone output of a Conv2d/Linear ({why}); nothing to fold")
    return Plan({}, (LayerPlan("fold_bn", {}),))


register_recipe("fold_bn", fold_bn_plan)
