"""Low-rank GRU/LSTM method ``svd_rnn`` and its recipe.

``LayerPlan("svd_rnn", {"rank_ih": 3, "rank_hh": 16, "per_gate": True})`` replaces an ``nn.GRU`` /
``nn.LSTM`` by a `LowRankRNN`; a rank of ``None`` keeps that matrix dense.

The recipe ``svd_rnn`` (and the ``svd`` recipe, which calls `rnn_choices` for recurrent layers)
turns ``ratio`` = kept fraction of each recurrent layer's weight-matrix entries (``weight_ih`` and
``weight_hh``; biases are not factorized) into ranks: each matrix independently gets the largest
rank whose factors hold at most ``ratio`` of its weights; a matrix where no rank saves weights is
kept dense.

FLOPs of PyTorch's fused LSTM kernel are counted by `workbench.flop_formulas`, so dense and
low-rank LSTMs are compared on equal terms.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import get_submodule
from workbench.kernels import svd as svd_kernels
from workbench.kernels.tensor import check_int_rank
from workbench.layers.recurrent import (GATES, LowRankRNN, factored_weights, max_rank, recurrent_layers,
                                        rnn_kind, unsupported_reason, with_article)
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, register_method, register_recipe


def build_svd_rnn(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    per_gate = params.get("per_gate", True)
    if not isinstance(per_gate, bool):
        raise WorkbenchError(f"per_gate={per_gate!r} must be true or false")
    return LowRankRNN.from_rnn(module, params.get("rank_ih"), params.get("rank_hh"), per_gate=per_gate,
                               name=context.name)


register_method(Method("svd_rnn", build_svd_rnn, (nn.GRU, nn.LSTM), rank_params=("rank_ih", "rank_hh"),
                       description="GRU/LSTM with low-rank weight_ih / weight_hh (per gate or stacked)"))


def recurrent_weights(rnn: nn.Module) -> int:
    """Entries of ``weight_ih`` + ``weight_hh`` of a single-layer GRU/LSTM (the 'recurrent parameters')."""
    return rnn.weight_ih_l0.numel() + rnn.weight_hh_l0.numel()


def ranks_for_ratio(rnn: nn.Module, ratio: float, per_gate: bool = True) -> dict:
    """``{"rank_ih", "rank_hh", "per_gate"}`` keeping at most ``ratio`` of each matrix (None: dense)."""
    svd_kernels.check_fraction(ratio, "ratio")
    kind = rnn_kind(rnn)
    g, h = len(GATES[kind]), rnn.hidden_size
    settings: dict[str, Any] = {"per_gate": per_gate}
    for side, cols in (("ih", rnn.input_size), ("hh", h)):
        rows = h if per_gate else g * h
        rank = svd_kernels.rank_for_ratio((rows, cols), ratio)
        dense = g * h * cols
        saves = factored_weights(kind, side, rnn.input_size, h, rank, per_gate) < dense
        settings[f"rank_{side}"] = rank if saves and rank <= max_rank(kind, side, rnn.input_size, h, per_gate) else None
    return settings


def rnn_choices(model: nn.Module, ratio: float, layers: list[str] | None = None,
                per_gate: bool = True) -> dict[str, LayerPlan]:
    """``{name: LayerPlan("svd_rnn", ...)}`` for the supported recurrent layers of ``model``.

    ``layers``: only these names (others ignored). Unsupported RNNs (multi-layer, bidirectional)
    named explicitly raise; found by the scan they are skipped (left dense).
    """
    choices = {}
    for name, rnn in recurrent_layers(model):
        if layers is not None and name not in layers:
            continue
        reason = unsupported_reason(rnn)
        if reason:
            if layers is not None:
                raise UnsupportedLayerError(f"layer {name!r} is {with_article(rnn_kind(rnn))} with {reason}; it is left dense")
            continue
        settings = ranks_for_ratio(rnn, ratio, per_gate)
        if settings["rank_ih"] is not None or settings["rank_hh"] is not None:
            choices[name] = LayerPlan("svd_rnn", settings)
    return choices


def svd_rnn_plan(model: nn.Module, *, ratio: float | None = None, ranks: Mapping[str, Any] | None = None,
                 layers: list[str] | None = None, per_gate: bool = True) -> Plan:
    """Plan for the recurrent layers only: ``ratio`` (see module doc) or ``ranks``
    ``{layer: rank}`` (one int for both matrices, capped at each one's largest rank, or a pair
    ``(rank_ih, rank_hh)``). A matrix whose factors at that rank would hold at least as many
    weights as the matrix itself stays dense (``None``), as the ``svd`` recipe does for Linear."""
    if (ratio is None) == (ranks is None):
        raise WorkbenchError("svd_rnn needs exactly one of ratio or ranks")
    if ratio is not None:
        return Plan(rnn_choices(model, ratio, layers, per_gate))
    choices = {}
    layout = "per gate" if per_gate else "stacked"
    for name, rank in ranks.items():
        module = get_submodule(model, name)
        kind = rnn_kind(module)
        pair = tuple(rank) if isinstance(rank, (tuple, list)) else None
        limits = {side: max_rank(kind, side, module.input_size, module.hidden_size, per_gate) for side in ("ih", "hh")}
        if pair is None:  # one int for both matrices: at most the larger one's rank, capped per matrix
            check_int_rank(rank, "rank", max(limits.values()),
                           f"the larger of the largest ranks of weight_ih ({limits['ih']}) and weight_hh "
                           f"({limits['hh']}, {layout})", f" for layer {name!r}")
        settings: dict[str, Any] = {"per_gate": per_gate}
        for i, side in enumerate(("ih", "hh")):
            r = pair[i] if pair is not None else min(rank, limits[side])
            if r is not None:
                check_int_rank(r, f"rank_{side}", limits[side], f"the largest rank of weight_{side} ({layout})",
                               f" for layer {name!r}")
                dense = factored_weights(kind, side, module.input_size, module.hidden_size, None, per_gate)
                if factored_weights(kind, side, module.input_size, module.hidden_size, r, per_gate) >= dense:
                    r = None  # its factors would hold more weights than the matrix: left dense
            settings[f"rank_{side}"] = r
        if settings["rank_ih"] is not None or settings["rank_hh"] is not None:
            choices[name] = LayerPlan("svd_rnn", settings)
    return Plan(choices)


register_recipe("svd_rnn", svd_rnn_plan)


# --------------------------------------------------------------------------- the `svd` recipe's share
def ranks_for_energy(rnn: nn.Module, energy: float, per_gate: bool = True) -> dict:
    """``{"rank_ih", "rank_hh", "per_gate"}``: per matrix, the smallest rank keeping ``energy`` of
    sigma^2 (per gate: the largest such rank over the gates, since gates share one rank); None
    (dense) where that rank would not save weights."""
    svd_kernels.check_fraction(energy, "energy")
    kind = rnn_kind(rnn)
    g, h = len(GATES[kind]), rnn.hidden_size
    settings: dict[str, Any] = {"per_gate": per_gate}
    for side, cols in (("ih", rnn.input_size), ("hh", h)):
        w = getattr(rnn, f"weight_{side}_l0").detach()
        blocks = w.chunk(g, 0) if per_gate else (w,)
        rank = max(svd_kernels.rank_for_energy(svd_kernels.singular_values(b), energy) for b in blocks)
        saves = factored_weights(kind, side, rnn.input_size, h, rank, per_gate) < g * h * cols
        settings[f"rank_{side}"] = rank if saves else None
    return settings


def recurrent_part(model: nn.Module, *, ratio: float | None = None, energy: float | None = None,
                   ranks: Mapping[str, Any] | None = None, layers: list[str] | None = None,
                   per_gate: bool = True) -> tuple[dict[str, LayerPlan], Mapping[str, Any] | None,
                                                   list[str] | None]:
    """The GRU/LSTM share of the ``svd`` recipe.

    Returns ``(choices for recurrent layers, ranks without them, layers without them)`` so that
    the matrix-layer part of the recipe sees only Linear/Conv2d names. ``ratio`` / ``energy``
    apply to every supported recurrent layer (or those in ``layers``); ``ranks`` entries naming a
    recurrent layer set both of its matrices (capped per matrix). Unsupported RNNs found by the
    scan stay dense; named explicitly they raise `UnsupportedLayerError`.
    """
    found = dict(recurrent_layers(model))
    choices: dict[str, LayerPlan] = {}
    if ranks is not None:
        mine = {name: rank for name, rank in ranks.items() if name in found}
        if mine:
            choices = dict(svd_rnn_plan(model, ranks=mine, per_gate=per_gate).layers)
        return choices, {n: r for n, r in ranks.items() if n not in found}, layers
    names = [n for n in (layers if layers is not None else found) if n in found]
    for name in names:
        rnn = found[name]
        reason = unsupported_reason(rnn)
        if reason:
            if layers is not None:
                raise UnsupportedLayerError(f"layer {name!r} is {with_article(rnn_kind(rnn))} with {reason}; it is left dense")
            continue
        settings = (ranks_for_ratio(rnn, ratio, per_gate) if ratio is not None
                    else ranks_for_energy(rnn, energy, per_gate))
        if settings["rank_ih"] is not None or settings["rank_hh"] is not None:
            choices[name] = LayerPlan("svd_rnn", settings)
    rest = None if layers is None else [n for n in layers if n not in found]
    return choices, ranks, rest
