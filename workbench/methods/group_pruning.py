"""Group-level structured pruning ("prune_groups"): channels coupled by residual adds,
concatenations and normalization are removed together, one importance per group.

The groups come from Torch-Pruning's dependency graph (`tp.DependencyGraph`), the scores from its
group importances (magnitude, Taylor, Hessian/OBD; each normalised by its group mean, so scores of
different groups compare). ``ratio`` is the KEPT fraction of each group's channels:
``round(ratio * C)`` channels of a group of ``C`` (rounded to a multiple of ``round_to`` when
given). With ``global_ranking`` one cut over all groups keeps ``round(ratio * sum C)`` channels in
total, no group losing more than ``max_ratio`` of its channels.

Which channels go is decided once, when the plan is made (`group_removals`); the step records them
(``roots``: each group's root layer, ``removed``: its removed channel indices), so ``apply`` and
file loading rebuild exactly the same model without calibration data.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from workbench.device import model_device
from workbench.errors import WorkbenchError
from workbench.registry import LayerContext, Method, register_method

IMPORTANCES = ("magnitude", "taylor", "hessian")
ROOT_TYPES = (nn.Conv2d, nn.Linear)


def check_group_settings(ratio: Any, importance: Any = "magnitude", round_to: Any = None,
                         max_ratio: Any = 0.9) -> None:
    """Raise `WorkbenchError` naming the value and the rule for a bad setting."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise WorkbenchError(f"ratio={ratio!r} must be in (0, 1]: it is the kept fraction of each group's channels")
    if importance not in IMPORTANCES:
        raise WorkbenchError(f"importance={importance!r} is not one of {', '.join(IMPORTANCES)}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise WorkbenchError(f"round_to={round_to!r} must be a whole number >= 1 (channels kept in multiples of it)")
    if isinstance(max_ratio, bool) or not isinstance(max_ratio, (int, float)) or not 0 < max_ratio < 1:
        raise WorkbenchError(f"max_ratio={max_ratio!r} must be in (0, 1): the largest fraction of one group's "
                             "channels that global ranking may remove (1 would empty it)")


def trace(model: nn.Module, shape: Sequence[int]) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` traced with a zero input of ``shape``."""
    try:
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=torch.zeros(tuple(shape), device=model_device(model)))
    except Exception as exc:  # tracing failures come from arbitrary user models
        raise WorkbenchError(f"cannot trace the model with an input of shape {tuple(shape)} "
                             f"for structured pruning: {exc}") from None


def _output_layer(model: nn.Module) -> nn.Module | None:
    layers = [m for m in model.modules() if isinstance(m, ROOT_TYPES)]
    return layers[-1] if layers else None


def coupled_groups(model: nn.Module, graph: tp.DependencyGraph) -> list:
    """Every group of coupled output channels whose root is a Conv2d/Linear other than the output
    layer (whose width is the model's output), in graph order."""
    out = _output_layer(model)
    return list(graph.get_all_groups(ignored_layers=[out] if out is not None else [], root_module_types=ROOT_TYPES))


def root_name(graph: tp.DependencyGraph, group) -> str:
    return graph._module2name[group[0].dep.target.module]


def members(graph: tp.DependencyGraph, group) -> list[str]:
    """Names of the modules whose channels a group prunes (outputs and the inputs that read them)."""
    names = [graph._module2name.get(dep.target.module) for dep, _ in group]
    return list(dict.fromkeys(n for n in names if n))


def _scorer(importance: str):
    if importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupHessianImportance()


def _gradients(model: nn.Module, scorer, importance: str, data) -> None:
    """Cross-entropy gradients on ``data = (inputs, targets)`` for Taylor (mean loss) or Hessian
    (per-sample squared gradients, accumulated by the scorer)."""
    if data is None:
        raise WorkbenchError(f"importance={importance!r} needs calibration inputs and class labels (a classifier "
                             "task with training labels); use importance='magnitude' for this model")
    inputs, targets = data
    model.zero_grad()
    losses = nn.functional.cross_entropy(model(inputs), targets, reduction="none")
    if importance == "taylor":
        losses.mean().backward()
        return
    scorer.zero_grad()
    for i, loss in enumerate(losses):
        model.zero_grad()
        loss.backward(retain_graph=i < len(losses) - 1)
        scorer.accumulate_grad(model)


def kept_counts(scores: list[torch.Tensor], ratio: float, round_to: int | None = None,
                global_ranking: bool = False, max_ratio: float = 0.9) -> list[int]:
    """Channels kept per group. Local: ``round(ratio * C)``; global: the ``round(ratio * sum C)``
    best scores over all groups, each group keeping at least ``ceil((1 - max_ratio) * C)``.
    Then rounded to the nearest multiple of ``round_to`` (at least ``round_to``, at most ``C``)."""
    sizes = [len(s) for s in scores]
    if not global_ranking:
        kept = [int(round(ratio * c)) for c in sizes]
    else:
        floors = [math.ceil((1 - max_ratio) * c - 1e-9) for c in sizes]
        total = int(round(ratio * sum(sizes)))
        kept = list(floors)
        rest = [(float(s[i]), g, i) for g, s in enumerate(scores)
                for i in torch.argsort(s, descending=True, stable=True)[floors[g]:].tolist()]
        for _, g, _ in sorted(rest, key=lambda t: -t[0])[:max(0, total - sum(floors))]:
            kept[g] += 1
    if round_to:
        kept = [min(c, max(round_to, round_to * int(math.floor(k / round_to + 0.5)))) for k, c in zip(kept, sizes)]
    return kept


def ranked_groups(model: nn.Module, shape: Sequence[int], importance: str = "magnitude",
                  data: tuple[torch.Tensor, torch.Tensor] | None = None, frozen: Sequence[str] = ()) -> list[dict]:
    """``[{"root", "members", "scores"}]`` per coupled group: ``scores`` (C,), one per output channel of
    the group (higher: more important), normalised by the group mean.

    Scores are computed on ``model`` (Taylor / Hessian: gradients of the cross-entropy on
    ``data = (inputs (n, ...), class labels (n,))``); pass a copy: gradients are left on it.
    Groups touching a ``frozen`` layer (a tied weight) are left out.
    """
    check_group_settings(1.0, importance)
    graph = trace(model, shape)
    groups = [g for g in coupled_groups(model, graph) if not set(members(graph, g)) & set(frozen)]
    if not groups:
        raise WorkbenchError("this model has no group of channels that can be removed (structured pruning takes "
                             "nn.Conv2d / nn.Linear outputs other than the output layer's)")
    scorer = _scorer(importance)
    if importance != "magnitude":
        _gradients(model, scorer, importance, data)
    rows = []
    for group in groups:
        score = scorer(group)
        if score is None:
            raise WorkbenchError(f"the group rooted at {root_name(graph, group)!r} ({', '.join(members(graph, group))}) "
                                 f"has no weights that importance={importance!r} can score, so it cannot be ranked")
        rows.append({"root": root_name(graph, group), "members": members(graph, group),
                     "scores": score.detach().cpu().float()})
    model.zero_grad(set_to_none=True)
    return rows


def channel_order(scores: torch.Tensor) -> list[int]:
    """Channel indices, most important first (ties: lower index first)."""
    return torch.argsort(scores, descending=True, stable=True).tolist()


def group_removals(model: nn.Module, shape: Sequence[int], ratio: float, importance: str = "magnitude",
                   round_to: int | None = None, global_ranking: bool = False, max_ratio: float = 0.9,
                   data: tuple[torch.Tensor, torch.Tensor] | None = None, frozen: Sequence[str] = ()) -> list[dict]:
    """``[{"root", "members", "channels_before", "channels_after", "removed"}]`` per coupled group.

    Groups and scores as in `ranked_groups` (pass a copy of the model). Raises `WorkbenchError`
    when a group would keep no channel, before anything is removed.
    """
    check_group_settings(ratio, importance, round_to, max_ratio)
    ranked = ranked_groups(model, shape, importance, data, frozen)
    kept = kept_counts([row["scores"] for row in ranked], ratio, round_to, global_ranking, max_ratio)
    rows = []
    for row, k in zip(ranked, kept):
        name, score = row["root"], row["scores"]
        if k < 1:
            raise WorkbenchError(f"ratio={ratio:g} keeps 0 of the {len(score)} channels of the group rooted at "
                                 f"{name!r} ({', '.join(row['members'])}); raise ratio (a group cannot be removed whole)")
        rows.append({"root": name, "members": row["members"], "channels_before": len(score),
                     "channels_after": k, "removed": sorted(channel_order(score)[k:])})
    return rows


def _out_pruning_fn(module: nn.Module):
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def build_groups(model: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """Remove the recorded channels (in place on the copy ``apply`` made).

    ``params``: ``roots`` (each group's root layer), ``removed`` (its removed output channels,
    one tuple per root), ``input_shape``; ``ratio``, ``importance``, ... record how they were chosen.
    Every group is checked before the first edit.
    """
    layers, removed, shape = params.get("roots"), params.get("removed"), params.get("input_shape")
    if not shape or layers is None or removed is None or len(layers) != len(removed):
        raise WorkbenchError("prune_groups needs input_shape and one 'removed' list per entry of 'roots' "
                             "(make the plan with get_recipe('prune')(model, ratio=..., structured=True))")
    graph = trace(model, shape)
    groups = []
    for name, rows in zip(layers, removed):
        module = model.get_submodule(name)
        if not isinstance(module, ROOT_TYPES):
            raise WorkbenchError(f"layer {name!r} is a {type(module).__name__}; group roots are Conv2d / Linear")
        width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
        if not rows:
            continue
        if len(set(rows)) >= width or min(rows) < 0 or max(rows) >= width:
            raise WorkbenchError(f"removing channels {list(rows)[:8]}... of layer {name!r} (width {width}) is out of "
                                 "range or would remove the whole group")
        group = graph.get_pruning_group(module, _out_pruning_fn(module), idxs=list(rows))
        if not graph.check_pruning_group(group):
            raise WorkbenchError(f"removing {len(rows)} channels of the group rooted at {name!r} would empty a dependent layer")
        groups.append(group)
    for group in groups:  # all validated before the first edit
        group.prune()
    return model


register_method(Method("prune_groups", build_groups, (nn.Module,), kind="step",
                       description="remove coupled channel groups (Torch-Pruning dependency graph, group importance)"))


def group_rows(original: nn.Module, compressed: nn.Module, plan) -> list[dict]:
    """``[{"root", "members", "channels_before", "channels_after"}]`` of every ``prune_groups`` step,
    read from the built models (root output widths)."""
    def width(m):
        return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    rows = []
    for step in plan.steps:
        if step.method != "prune_groups":
            continue
        for root, group in zip(step["roots"], step["members"]):
            rows.append({"root": root, "members": list(group),
                         "channels_before": width(original.get_submodule(root)),
                         "channels_after": width(compressed.get_submodule(root))})
    return rows
