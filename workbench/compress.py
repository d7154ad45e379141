"""``apply(model, plan) -> new model``: the only way a plan touches a model.

The user's model is deep-copied first and never modified; every layer is validated and built on
the copy, so a bad entry raises before anything is returned (nothing is half-applied).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from workbench.adapters import canonical
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.hooks import collect_layer_inputs
from workbench.inventory import get_submodule, set_submodule
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, get_method
from workbench.sequential import build_in_order
from workbench.ties import build_shared, check_shareable, tied_module_groups


def check_layer_choice(module: nn.Module, name: str, choice: LayerPlan) -> Method:
    """The method of ``choice`` after checking it can compress ``module`` (layer ``name``).

    The one validator of a plan's layer entries, shared by `apply` and the engine: the method
    exists and is per-layer, handles the module's type, and accepts this module and its settings
    (the method's own ``check``). Raises `WorkbenchError` naming the value and what is allowed.

    A layer that an adapter converts (`workbench.adapters`: a ``transformers`` Conv1D) is judged as
    its ``nn.Linear`` equivalent, and the Method returned takes the ORIGINAL module: its
    ``build`` / ``skeleton`` / ``view`` / ``check`` hand the method that equivalent. So every caller
    that builds from what this validator returns (`apply`, sequential calibration, the engine)
    compresses such layers as Linears, the user's module untouched.
    """
    method = get_method(choice.method)
    if method.kind != "layer":
        raise WorkbenchError(f"{choice.method!r} is a whole-model step; put it in plan.steps")
    target = canonical(module)
    if not isinstance(target, method.layer_types):
        allowed = ", ".join(t.__name__ for t in method.layer_types)
        raise UnsupportedLayerError(f"method {choice.method!r} cannot compress layer {name!r} of type "
                                    f"{type(module).__name__}; it handles: {allowed}")
    if method.check is not None:
        method.check(target, choice.params, name)
    return method if target is module else _through_adapter(method, module, target)


def _through_adapter(method: Method, original: nn.Module, equivalent: nn.Module) -> Method:
    """``method`` whose hooks take ``original`` (or another module of its type) and run on its
    adapter's equivalent (``equivalent`` for ``original``, converted once). A replacement that is
    the equivalent itself (a method leaving the layer as it is) gives back the original module."""
    def through(hook):
        if hook is None:
            return None

        def run(module, *args):
            target = equivalent if module is original else canonical(module)
            result = hook(target, *args)
            return module if result is target else result
        return run
    return dataclasses.replace(method, build=through(method.build), skeleton=through(method.skeleton),
                               view=through(method.view), check=through(method.check))


def _describe(choice: LayerPlan) -> str:
    return f"{choice.method}({', '.join(f'{k}={v!r}' for k, v in choice.params.items())})"


def tied_choices(model: nn.Module, plan: Plan,
                 groups: list[tuple[str, ...]] | None = None) -> list[tuple[tuple[str, ...], LayerPlan]]:
    """The tied groups of ``model`` that ``plan`` compresses, each with its one choice.

    The tie rule (`apply` and the engine): modules that share a weight tensor
    (`workbench.ties.tied_module_groups`, e.g. ``dec.weight = enc.weight``) are compressed as one
    or left dense, never one copy compressed and the other kept dense (the weight would be stored
    twice). So a plan names every member of a group with the same choice, or none of them; a plan
    naming some members only, or giving members different choices, is refused, as is a group
    whose members are not the same layer apart from their biases (`workbench.ties.check_shareable`).
    ``groups``: ``tied_module_groups(model)`` when the caller holds it already (the engine).
    Raises `WorkbenchError` naming the group and what is allowed.
    """
    found = []
    for group in tied_module_groups(model) if groups is None else groups:
        named = [name for name in group if name in plan.layers]
        if not named:
            continue
        choices = {plan.layers[name] for name in named}
        if len(named) < len(group) or len(choices) > 1:
            members = ", ".join(f"{name!r} ({type(model.get_submodule(name)).__name__})" for name in group)
            given = ", ".join(f"{name!r}: {_describe(plan.layers[name])}" for name in named)
            dense = [name for name in group if name not in plan.layers]
            raise WorkbenchError(f"layers {members} share one weight tensor (tied); a tied group is compressed as "
                                 f"one or left dense: give all of {list(group)} the same choice, or none of them. "
                                 f"The plan gives {given}" + (f" and leaves {dense} dense" if dense else ""))
        check_shareable({name: model.get_submodule(name) for name in group})
        found.append((group, plan.layers[group[0]]))
    return found


def build_tied_group(members: dict[str, nn.Module], method: Method, choice: LayerPlan,
                     layer_inputs: dict[str, torch.Tensor], build=None) -> dict[str, nn.Module]:
    """``{name: replacement}`` of one tied group compressed with ``choice``: ``method`` builds ONCE
    and every member gets that module (`workbench.ties.build_shared`), so the factors / codes are
    stored once. A data-aware method is fitted on the inputs of all members together
    (``layer_inputs[name]``: ``(tokens, in)`` or ``(n, c, h, w)`` each, concatenated on dim 0): the
    one shared weight serves all of them. ``build``: the builder to call (default ``method.build``;
    `apply` passes the skeleton when it only rebuilds a structure)."""
    build = build or method.build
    names = list(members)
    inputs = None
    if method.needs_inputs and all(name in layer_inputs for name in names):
        chunks = [layer_inputs[name] for name in names]
        if len({tuple(c.shape[1:]) for c in chunks}) > 1:
            raise WorkbenchError(f"tied layers {names} see inputs of different shapes "
                                 f"({', '.join(str(tuple(c.shape[1:])) for c in chunks)}); a data-aware method "
                                 "cannot fit one weight on all of them: leave the group dense or use a method "
                                 "without calibration")
        inputs = torch.cat(chunks)
    context = LayerContext(names[0], inputs)
    return build_shared(members, lambda module: build(module, choice.params, context))


def apply(model: nn.Module, plan: Plan, calibration_inputs: torch.Tensor | None = None,
          structure_only: bool = False) -> nn.Module:
    """A new model with ``plan`` applied; ``model`` is left exactly as it was.

    ``calibration_inputs``: model inputs used by data-aware methods (e.g. activation-aware SVD).
    ``structure_only``: where a method has a ``skeleton`` builder, build only the structure (the
    weights are about to be loaded from a file), skipping decompositions and calibration.
    Tied layers follow the tie rule of `tied_choices`: a group is compressed as one (the same
    replacement module at every name, built once) or left dense.
    Raises `WorkbenchError` for an unknown layer or method, a method that does not apply to the
    layer's type, settings out of range, or a plan that splits a tied group.
    """
    if not isinstance(plan, Plan):
        raise WorkbenchError(f"apply needs a workbench.Plan, got {type(plan).__name__}")
    new = copy.deepcopy(model)
    for step in plan.steps:
        method = get_method(step.method)
        if method.kind != "step":
            raise WorkbenchError(f"{step.method!r} is a per-layer method; put it in plan.layers, not plan.steps")
        new = method.build(new, step.params, LayerContext(name=""))

    entries = []
    for name, choice in plan.layers.items():
        module = get_submodule(new, name)
        entries.append((name, module, check_layer_choice(module, name, choice), choice))
    groups = tied_choices(new, plan)
    tied = {name for group, _ in groups for name in group}

    def builder(method):
        return method.skeleton if structure_only and method.skeleton is not None else method.build

    needing = [name for name, _, method, _ in entries if method.needs_inputs and builder(method) is method.build]
    if any(choice.params.get("sequential") for name, _, method, choice in entries if name in needing):
        if calibration_inputs is None:
            raise WorkbenchError(f"layers {needing} use sequential calibration; pass calibration_inputs to apply()")
        if groups:
            raise WorkbenchError(f"tied layers {list(groups[0][0])}: sequential calibration builds one layer at a "
                                 "time and cannot compress a tied group as one; leave the group out of the plan "
                                 "or use a plan without sequential=True")
        return build_in_order(new, entries, calibration_inputs).eval()
    layer_inputs: dict[str, torch.Tensor] = {}
    if needing:
        if calibration_inputs is None:
            raise WorkbenchError(
                f"layers {needing} use a data-aware method; pass calibration_inputs to apply()")
        layer_inputs = collect_layer_inputs(new, needing, calibration_inputs)

    built = [(name, builder(method)(module, choice.params, LayerContext(name, layer_inputs.get(name))))
             for name, module, method, choice in entries if name not in tied]
    methods = {name: method for name, _, method, _ in entries}
    for group, choice in groups:
        members = {name: get_submodule(new, name) for name in group}
        method = methods[group[0]]
        built += build_tied_group(members, method, choice, layer_inputs, builder(method)).items()
    for name, replacement in built:
        set_submodule(new, name, replacement)
    return new.eval()
