"""Low-rank (truncated SVD) method for Linear and Conv2d layers, and the ``svd`` recipe."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import get_submodule
from workbench.kernels import svd as svd_kernels
from workbench.layers.lowrank import LowRankConv2d, LowRankLinear, SlicedLowRank
from workbench.methods.recurrent import recurrent_part
from workbench.methods.units import Units, unit_names, unit_of, unit_table
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, register_method, register_recipe
from workbench.spectra import layer_svd


def check_svd(module: nn.Module, params: Mapping[str, Any], name: str) -> None:
    """Refuse a grouped conv or a rank outside ``1..min(out, in)`` before anything is built."""
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise UnsupportedLayerError(f"layer {name!r} is a grouped conv (groups={module.groups}); SVD needs groups=1")
    svd_kernels.check_rank(params.get("rank"), (module.weight.shape[0], module.weight[0].numel()), name)


def build_svd(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """Replace ``module`` by its rank-``params['rank']`` factorization (the cached SVD, sliced)."""
    rank = params.get("rank")
    check_svd(module, params, context.name)
    factors = context.factors(rank) if context.factors is not None else layer_svd(module).factors(rank)
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_linear(module, rank, factors=factors, name=context.name)
    return LowRankConv2d.from_conv(module, rank, factors=factors, name=context.name)


def view_svd(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module | None:
    """What a rank slider evaluates: a `SlicedLowRank` over slices of the cached factors (no copy,
    no module build), computing exactly what `build_svd`'s layer computes. None without factors."""
    if context.factors is None or set(params) != {"rank"}:
        return None
    check_svd(module, params, context.name)
    a, b = context.factors(params["rank"])
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return LowRankConv2d.from_conv(module, params["rank"], factors=(a, b), name=context.name).eval()
    return SlicedLowRank(module, a, b, context.channels_last)


register_method(Method("svd", build_svd, (nn.Linear, nn.Conv2d), rank_params=("rank",), check=check_svd,
                       view=view_svd, factorized=True,
                       description="truncated SVD into two real factor layers"))


def _layer_key(model: nn.Module, units: Units, dense: dict, name: str) -> str:
    get_submodule(model, name)
    key = unit_of(units, dense, name)
    if key is None:
        raise WorkbenchError(f"layer {name!r} cannot be factorized; svd compresses: {unit_names(units)}")
    return key


SEQUENTIAL_TIED = ("sequential calibration builds one layer at a time in forward order, each fitted to the "
                   "partly compressed model's inputs; one shared weight serving layers at several depths "
                   "cannot be fitted that way (workbench.apply refuses it)")


def svd_plan(model: nn.Module, *, ratio: float | None = None, energy: float | None = None,
             ranks: Mapping[str, int] | None = None, layers: list[str] | None = None,
             activation_aware: str | None = None, sequential: bool = False, refit: bool | None = None) -> Plan:
    """A plan of per-layer SVD ranks, chosen by exactly one rule.

    ``ratio``: kept-parameter ratio per layer (rank r with r*(m+n) <= ratio*m*n);
    ``energy``: smallest rank keeping that fraction of sigma^2; ``ranks``: ``{layer: rank}``.
    ``layers`` restricts ``ratio``/``energy`` to some layers (default: every Linear/Conv2d).
    A layer whose rank would not save weights (rank > breakeven) is left dense.
    A tied group (`workbench.inventory.tied_groups`) is one unit: its shared matrix gets one
    rank, given to every member (naming one member in ``ranks`` or ``layers`` names the group);
    groups it cannot compress are in the plan's ``left_dense`` with the reason.
    ``activation_aware``: "whiten" or "scale" makes each layer a data-aware ``svd_aware`` choice;
    with ``sequential=True`` its layers are calibrated in forward order on the partly compressed
    model (`workbench.sequential`), fitting the original outputs unless ``refit=False``; tied
    groups then stay dense (`SEQUENTIAL_TIED`).
    """
    method, extra = ("svd", {}) if activation_aware is None else ("svd_aware", {"aware": activation_aware})
    if sequential:
        if activation_aware is None:
            raise WorkbenchError("sequential=True calibrates data-aware layers; "
                                 "give activation_aware='whiten' or 'scale'")
        extra.update(sequential=True, refit=True if refit is None else bool(refit))
    given = [k for k, v in (("ratio", ratio), ("energy", energy), ("ranks", ranks)) if v is not None]
    if len(given) != 1:
        raise WorkbenchError(f"svd needs exactly one of ratio, energy or ranks; got {given or 'none'}")
    units, dense = unit_table(model, (lambda info: SEQUENTIAL_TIED) if sequential else None)
    infos = {key: info for key, (_, info) in units.items()}
    # GRU/LSTM layers go to `svd_rnn` (ratio = kept fraction of recurrent weights); the rest below.
    choices, ranks, layers = recurrent_part(model, ratio=ratio, energy=energy, ranks=ranks, layers=layers)
    if ranks is not None:
        keyed: dict[str, int] = {}
        for name, rank in ranks.items():
            module = get_submodule(model, name)
            key = unit_of(units, dense, name)
            if key is None:
                raise WorkbenchError(f"layer {name!r} is a {type(module).__name__}; svd compresses: {unit_names(units)}")
            if keyed.setdefault(key, rank) != rank:
                raise WorkbenchError(f"ranks gives the tied layers {list(units[key][0])} different ranks "
                                     f"({keyed[key]} and {rank}); they share one weight: give one rank")
        for key, rank in keyed.items():
            svd_kernels.check_rank(rank, infos[key].shape, key)
            if rank <= svd_kernels.breakeven_rank(infos[key].shape):
                choices.update(dict.fromkeys(units[key][0], LayerPlan(method, {"rank": rank, **extra})))
        return Plan(choices, left_dense=dense)
    if ratio is not None:
        svd_kernels.check_fraction(ratio, "ratio")
    else:
        svd_kernels.check_fraction(energy, "energy")
    keys = list(units) if layers is None else [_layer_key(model, units, dense, name) for name in layers]
    keys = list(dict.fromkeys(keys))
    for key in keys:
        shape = infos[key].shape
        if ratio is not None:
            rank = svd_kernels.rank_for_ratio(shape, ratio)
        else:
            rank = svd_kernels.rank_for_energy(layer_svd(model.get_submodule(key)).s, energy)
        if rank <= svd_kernels.breakeven_rank(shape):
            choices.update(dict.fromkeys(units[key][0], LayerPlan(method, {"rank": rank, **extra})))
    return Plan(choices, left_dense=dense)


register_recipe("svd", svd_plan)
