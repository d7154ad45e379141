"""Pruning: unstructured magnitude pruning ("prune", per layer) and structured channel removal
("prune_structured", a whole-model step through Torch-Pruning's dependency graph); recipe "prune".

``ratio`` is always the KEPT fraction: of weights (unstructured) or of output neurons/channels
(structured). Structured pruning removes the weakest rows (smallest L1 norm, measured on the
original weights) and shrinks every layer that consumes them, so the model is really smaller and
computes exactly what the model with those neurons zeroed computes.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from workbench.device import model_device
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import get_submodule, matrix_layers
from workbench.kernels import prune as prune_kernels
from workbench.layers.sparse import SparseConv2d, SparseLinear, sparse_from_layer
from workbench.measure import count_params, latency_ms, speedup
from workbench.methods import group_pruning, head_pruning
from workbench.methods.units import unit_names, unit_of, unit_table
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, register_method, register_recipe

#: Calibration inputs that rank a transformer's heads and FFN units.
HEAD_CALIBRATION = 256
#: Kept fraction above which sparse storage (bitmap + values) is not smaller than dense float32.
SPARSE_BREAKEVEN_RATIO = 1 - 1 / 32


def layer_mask(module: nn.Module, params: Mapping[str, Any], name: str = "") -> torch.Tensor:
    """The keep-mask that ``params`` (exactly one of ``ratio`` / ``threshold``) gives ``module.weight``."""
    given = [k for k in ("ratio", "threshold") if params.get(k) is not None]
    if len(given) != 1:
        raise WorkbenchError(f"prune needs exactly one of ratio or threshold for layer {name!r}; got {given or 'none'}")
    if given[0] == "ratio":
        return prune_kernels.mask_by_ratio(module.weight, params["ratio"], name)
    return prune_kernels.mask_by_threshold(module.weight, params["threshold"], name)


def build_prune(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """A `SparseLinear` / `SparseConv2d` keeping the largest-magnitude weights of ``module``."""
    mask = layer_mask(module, params, context.name)
    return sparse_from_layer(module, mask, params.get("format", "auto"), context.name)


register_method(Method("prune", build_prune, (nn.Linear, nn.Conv2d),
                       description="magnitude pruning into sparse (bitmap or CSR) storage"))


# ------------------------------------------------------------------ structured
def output_layer_name(model: nn.Module) -> str | None:
    """The last Linear/Conv2d in module order: it produces the model's outputs and keeps its width."""
    names = [info.name for info in matrix_layers(model)]
    return names[-1] if names else None


def structured_candidates(model: nn.Module) -> list[str]:
    """Layers whose output neurons/channels may be removed: every Linear/Conv2d but the output one.

    Torch-Pruning's dependency graph takes ``nn.Linear`` / ``nn.Conv2d``; other matrix layers
    (``transformers`` Conv1D) are pruned unstructured only.
    """
    last = output_layer_name(model)
    return [info.name for info in matrix_layers(model)
            if info.name != last and isinstance(model.get_submodule(info.name), (nn.Linear, nn.Conv2d))]


def structured_removals(model: nn.Module, ratio: float, layers: Sequence[str]) -> dict[str, list[int]]:
    """``{layer: removed output rows}``: keep ``ceil(ratio * out)`` rows of largest L1 norm per layer.

    Importance is measured on ``model``'s weights as they are (before any removal), so the same
    rows can be zeroed in a masked copy to check the pruned model.
    """
    prune_kernels.check_ratio(ratio)
    allowed = structured_candidates(model)
    removals = {}
    for name in layers:
        module = get_submodule(model, name)
        if name not in allowed:
            if name == output_layer_name(model):
                raise WorkbenchError(f"layer {name!r} produces the model's outputs; removing its neurons "
                                     f"would change the output shape. Structured pruning handles: {', '.join(allowed)}")
            raise UnsupportedLayerError(f"layer {name!r} of type {type(module).__name__} cannot be pruned "
                                        f"structurally; candidates: {', '.join(allowed) or '(none)'}")
        removals[name] = prune_kernels.weakest_rows(module.weight, ratio, name)
    return removals


def build_structured(model: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """Remove output neurons/channels of ``params['layers']`` (in place on the copy ``apply`` made).

    ``params``: ``ratio`` (kept fraction of each layer's outputs), ``layers`` (names) and
    ``input_shape`` (an example input's shape, to trace the dependency graph).
    """
    ratio = prune_kernels.check_ratio(params.get("ratio"))
    layers = list(params.get("layers") or structured_candidates(model))
    shape = params.get("input_shape")
    if not shape:
        raise WorkbenchError("prune_structured needs input_shape (an example input's shape, e.g. [1, 64])")
    removals = structured_removals(model, ratio, layers)
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(tuple(shape), device=model_device(model)))
    except Exception as exc:  # tracing failures come from arbitrary user models
        raise WorkbenchError(f"cannot trace the model with an input of shape {tuple(shape)} "
                             f"for structured pruning: {exc}") from None
    groups = []
    for name, rows in removals.items():
        if not rows:
            continue
        module = model.get_submodule(name)
        fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, fn, idxs=rows)
        if not graph.check_pruning_group(group):
            raise WorkbenchError(f"removing {len(rows)} outputs of layer {name!r} would empty a dependent layer")
        groups.append(group)
    for group in groups:  # all groups validated before the first edit
        group.prune()
    return model


register_method(Method("prune_structured", build_structured, (nn.Module,), kind="step",
                       description="remove whole neurons/channels (Torch-Pruning dependency graph)"))


# ------------------------------------------------------------------ recipe
def example_shape(model: nn.Module, task=None) -> tuple[int, ...]:
    """Shape of one example input: the task's, else ``(1, in_features)`` of a first Linear layer."""
    if task is not None:
        return tuple(task.example_input.shape)
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if isinstance(first, nn.Linear):
        return (1, first.in_features)
    raise WorkbenchError("structured pruning needs an example input shape; pass task= (or input_shape=)")


STRUCTURED_TIED = ("structured pruning removes output rows of chosen layers and shrinks the layers that read "
                   "them; rows of a shared weight would vanish from every member at once, under consumers the "
                   "dependency graph does not shrink with them")


def importance_data(task, importance: str, n: int = 256):
    """``(inputs, class labels)`` for Taylor / Hessian importance: the task's training inputs and
    labels of a classifier (its calibration inputs); None when the task has no such labels."""
    if importance == "magnitude" or task is None:
        return None
    targets = getattr(task, "train_targets", None)
    if getattr(task, "calibration", None) is not None or targets is None or targets.dtype != torch.long:
        return None
    n = 128 if importance == "hessian" else n  # Hessian: one backward pass per sample
    return task.calibration_inputs(n), targets[:n]


def group_plan(model: nn.Module, task, ratio, layers, input_shape, **settings) -> Plan:
    """The ``prune_groups`` step: channels chosen now (on a copy), recorded in the plan."""
    group_pruning.check_group_settings(ratio, settings["importance"], settings["round_to"], settings["max_ratio"])
    if layers is not None:
        structured_removals(model, ratio, layers)  # validate names: output layer, types
    shape = tuple(input_shape) if input_shape else example_shape(model, task)
    data = importance_data(task, settings["importance"])
    _, dense = unit_table(model, lambda info: STRUCTURED_TIED)
    tied = [name for names in dense for name in names]
    rows = group_pruning.group_removals(copy.deepcopy(model), shape, ratio, data=data, frozen=tied, **settings)
    if layers is not None:
        rows = [row for row in rows if set(row["members"]) & set(layers)]
    matrices = {info.name for info in matrix_layers(model)}
    params = {"ratio": float(ratio), **settings, "input_shape": shape,
              "roots": tuple(row["root"] for row in rows),
              "members": tuple(tuple(row["members"]) for row in rows),
              "removed": tuple(tuple(row["removed"]) for row in rows),
              "layers": tuple(dict.fromkeys(n for row in rows for n in row["members"] if n in matrices))}
    return Plan({}, (LayerPlan("prune_groups", params),), left_dense=dense)


def head_plan(model: nn.Module, task, ratio, layers, importance, min_heads, round_to, global_ranking,
              max_ratio=0.9) -> Plan:
    """The ``prune_heads`` step of a transformer (`workbench.methods.head_pruning`): heads and FFN
    units chosen now (on the task's calibration inputs when there is a task), recorded in the plan;
    with ``global_ranking`` the blocks' sizes are allocated over all blocks (`head_allocation`)."""
    if importance in ("taylor", "hessian"):
        raise WorkbenchError(f"importance={importance!r} is for channel groups; heads and FFN units are ranked by "
                             f"{' or '.join(head_pruning.IMPORTANCES)} (output: their output energy on calibration data)")
    importance = {None: "output" if task is not None else "weights", "magnitude": "weights"}.get(importance, importance)
    head_pruning.check_settings(ratio, importance, min_heads, round_to)
    if importance == "output" and task is None:
        raise WorkbenchError("importance='output' measures heads on calibration inputs: pass task= (or use 'weights')")
    blocks = head_pruning.find_blocks(model)
    if layers is not None:
        blocks = [b for b in blocks if b.name in layers or set(b.linears) & set(layers)]
        if not blocks:
            raise WorkbenchError(f"layers {list(layers)} name no transformer block (nor one of its projections); "
                                 f"blocks: {', '.join(b.name for b in head_pruning.find_blocks(model))}")
    inputs = task.calibration_inputs(HEAD_CALIBRATION) if importance == "output" else None
    rows = head_pruning.head_removals(model, ratio, inputs, min_heads, round_to, blocks=blocks,
                                      global_ranking=global_ranking, max_ratio=max_ratio)
    allocation = {"global_ranking": True, "max_ratio": float(max_ratio)} if global_ranking else {}
    params = {"ratio": float(ratio), "importance": importance, "min_heads": min_heads, "round_to": round_to, **allocation,
              "blocks": tuple(r["block"] for r in rows),
              "heads_removed": tuple(tuple(r["heads_removed"]) for r in rows),
              "ffn_removed": tuple(tuple(r["ffn_removed"]) for r in rows),
              "layers": tuple(n for b in blocks for n in b.linears)}
    return Plan({}, (LayerPlan("prune_heads", params),))


def prune_plan(model: nn.Module, *, task=None, ratio: float | None = None, threshold: float | None = None,
               structured: bool = False, scope: str = "layer", layers: Sequence[str] | None = None,
               input_shape: Sequence[int] | None = None, importance: str | None = None,
               round_to: int | None = None, global_ranking: bool = False, max_ratio: float = 0.9,
               min_heads: int = 0) -> Plan:
    """A pruning plan.

    Parameters
    ----------
    ratio : kept fraction of weights (unstructured) or of each coupled channel group (structured).
    threshold : unstructured only: keep ``|w| > threshold`` in every chosen layer (instead of ratio).
    structured : remove whole channel groups (a ``prune_groups`` step, `workbench.methods.group_pruning`):
        channels coupled by residual adds / normalization go together, one importance per group.
        A BERT / GPT-2 / Llama model instead loses attention heads and FFN hidden units (a
        ``prune_heads`` step, `workbench.methods.head_pruning`): ``ratio`` is then the kept fraction
        of each block's Linear parameters, units ranked on the task's calibration inputs.
    scope : "layer" (each layer keeps ``ratio`` of its weights) or "global" (one magnitude cut
        over all chosen layers, keeping ``ratio`` of them in total).
    layers : layer names (default: every Linear/Conv2d; for structured, the groups holding them).
    importance, round_to, global_ranking, max_ratio : structured only: "magnitude" (L2, the default),
        "taylor" or "hessian" (need a classifier task's labels); kept channels in multiples of
        ``round_to``; one ranking over all groups, none losing more than ``max_ratio`` of its channels.
        Transformers: "output" (default with a task) or "weights"/"magnitude"; ``round_to`` for the FFN width;
        ``global_ranking``: ``ratio`` of all blocks' Linear parameters together, the units of every block
        ranked on one list by score per parameter (`head_allocation`), each block keeping at least
        ``max(min_heads, 1)`` heads and ``1 - max_ratio`` of its FFN units.
    min_heads : transformers: attention units (heads; k/v groups under GQA) each block keeps at least.

    A layer whose sparse storage would not be smaller than dense (kept fraction above
    ``SPARSE_BREAKEVEN_RATIO``) is left dense. A tied group is one unit (one mask for its shared
    weight, counted once in a global cut; naming one member names the group); structured pruning
    leaves tied groups dense (`STRUCTURED_TIED`, in the plan's ``left_dense``).
    """
    if structured:
        if threshold is not None:
            raise WorkbenchError("structured pruning is set by ratio (kept fraction of channels), not threshold")
        prune_kernels.check_ratio(ratio)
        if head_pruning.find_blocks(model):
            return head_plan(model, task, ratio, layers, importance, min_heads, round_to, bool(global_ranking),
                             max_ratio)
        if layers is None and not structured_candidates(model):
            raise WorkbenchError("this model has no layer whose neurons can be removed (structured pruning "
                                 "takes nn.Linear / nn.Conv2d layers other than the output one)")
        return group_plan(model, task, ratio, layers, input_shape, importance=importance or "magnitude", round_to=round_to,
                          global_ranking=bool(global_ranking), max_ratio=max_ratio)
    given = [k for k, v in (("ratio", ratio), ("threshold", threshold)) if v is not None]
    if len(given) != 1:
        raise WorkbenchError(f"prune needs exactly one of ratio or threshold; got {given or 'none'}")
    if scope not in ("layer", "global"):
        raise WorkbenchError(f"scope={scope!r} must be 'layer' or 'global'")
    units, dense = unit_table(model)
    keys = list(units) if layers is None else []
    for name in layers if layers is not None else ():
        module = get_submodule(model, name)
        key = unit_of(units, dense, name)
        if key is None:
            raise UnsupportedLayerError(f"layer {name!r} of type {type(module).__name__} cannot be pruned; "
                                        f"prunable layers: {unit_names(units)}")
        keys.append(key)
    keys = list(dict.fromkeys(keys))
    # one entry per unit: a tied group's shared weight counts once in a global cut
    weights = {key: model.get_submodule(key).weight.detach() for key in keys}
    if ratio is not None:
        prune_kernels.check_ratio(ratio)
        if scope == "global":
            cut = prune_kernels.global_threshold(weights, ratio)
            params = {key: {"threshold": cut} for key in keys}
        else:
            params = {key: {"ratio": float(ratio)} for key in keys}
    else:
        prune_kernels.check_threshold(threshold)
        params = {key: {"threshold": float(threshold)} for key in keys}
    choices = {}
    for key in keys:
        mask = layer_mask(model.get_submodule(key), params[key], key)  # raises if a layer would be emptied
        if float(mask.float().mean()) <= SPARSE_BREAKEVEN_RATIO:
            choices.update(dict.fromkeys(units[key][0], LayerPlan("prune", params[key])))
    return Plan(choices, left_dense=dense)


# ------------------------------------------------------------------ honest latency notes


def sparse_latency_rows(model: nn.Module, batch: int = 64, repeats: int = 30) -> list[dict]:
    """For every sparse layer of ``model``: its latency vs the dense layer it stands for.

    ``[{"name", "sparsity", "format", "sparse_ms", "dense_ms", "slower"}]``, median of
    ``repeats`` runs on a random ``(batch, in)`` input (convs: ``(batch, in, 8, 8)``).
    """
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, (SparseLinear, SparseConv2d)):
            continue
        dense, _ = module.to_masked()
        if isinstance(module, SparseLinear):
            x = torch.randn(batch, module.in_features)
        else:
            x = torch.randn(batch, module.spec.in_channels, 8, 8)
        x = x.to(module.values.device)
        sparse_ms, dense_ms = latency_ms(module, x, repeats, warmup=3), latency_ms(dense, x, repeats, warmup=3)
        rows.append({"name": name, "sparsity": round(1 - module.density(), 4), "format": module.format,
                     "sparse_ms": round(sparse_ms, 4), "dense_ms": round(dense_ms, 4),
                     "slower": sparse_ms > dense_ms})
    return rows


def speed_example(task, batch: int = 64) -> torch.Tensor | None:
    """The first ``batch`` evaluation inputs of ``task`` (the input of the speed comparison), or None."""
    inputs = getattr(task, "eval_inputs", None)
    return inputs[:batch] if isinstance(inputs, torch.Tensor) else None


def speed_row(original: nn.Module, compressed: nn.Module, task, repeats: int = 10) -> dict | None:
    """`workbench.measure.speedup` of ``compressed`` over ``original`` on 64 of the task's evaluation
    inputs (fixed threads, both in this run), beside the FLOP ratio; None without a task."""
    example = speed_example(task)
    return None if example is None else speedup(original, compressed, example, repeats=repeats)


def speed_note(speed: dict) -> str:
    """The `speed_row` figures in one sentence."""
    flops = "" if speed["flop_ratio"] is None else f", FLOPs {speed['flop_ratio']:.2f}x of the original's"
    return (f"measured speed-up {speed['speedup']:.2f}x ({speed['original_ms']:.2f} -> {speed['compressed_ms']:.2f} ms "
            f"at batch {speed['batch']}, {speed['threads']} threads, original measured in the same run){flops}")


def pruning_report(original: nn.Module, compressed: nn.Module, task=None, plan=None) -> dict:
    """``{"notes": [...], "sparse_latency": [...], "speed": {...}}`` for the CLI: where sparse layers
    are slower; the measured whole-model speed-up beside the FLOP ratio (`speed_row`); with a
    group-pruning ``plan``, ``"groups"``: each coupled group's channels before and after."""
    rows = sparse_latency_rows(compressed)
    notes = []
    speed = speed_row(original, compressed, task)
    if speed is not None:
        notes.append(speed_note(speed))
    for row in rows:
        verdict = "SLOWER than" if row["slower"] else "faster than"
        notes.append(f"{row['name']}: {row['sparsity']:.0%} sparse ({row['format']}) takes {row['sparse_ms']:.3f} ms "
                     f"at batch 64, {verdict} the dense layer ({row['dense_ms']:.3f} ms) on this CPU")
    if rows:
        notes.append("sparse storage saves bytes; on a CPU a sparse layer is usually slower than dense "
                     "below ~90% sparsity (bitmap layers always decompress first)")
    elif count_params(compressed) < count_params(original):
        notes.append("structured pruning: smaller dense layers, so time falls with the removed neurons")
    else:
        notes.append("nothing was pruned: at this kept ratio no layer's sparse storage (bitmap + values, "
                     "or CSR) would be smaller than its dense weights, so every layer stayed dense")
    result = {"notes": notes, "sparse_latency": rows}
    if speed is not None:
        result["speed"] = speed
    if plan is not None and any(step.method == "prune_groups" for step in plan.steps):
        result["groups"] = group_pruning.group_rows(original, compressed, plan)
    if plan is not None and any(step.method == "prune_heads" for step in plan.steps):
        blocks = head_pruning.head_rows(original, compressed, plan)
        result["blocks"] = blocks
        result["linear_params_kept"] = (sum(r["linear_params_after"] for r in blocks)
                                        / sum(r["linear_params_before"] for r in blocks))
    return result


register_recipe("prune", prune_plan, report=pruning_report)
