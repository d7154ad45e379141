"""``apply(model, plan) -> new model``: the only way a plan touches a model.

The user's model is deep-copied first and never modified; every layer is validated and built on
the copy, so a bad entry raises before anything is returned (nothing is half-applied).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.hooks import collect_layer_inputs
from workbench.inventory import get_submodule, set_submodule
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, get_method
from workbench.sequential import build_in_order


def check_layer_choice(module: nn.Module, name: str, choice: LayerPlan) -> Method:
    """The method of ``choice`` after checking it can compress ``module`` (layer ``name``).

    The one validator of a plan's layer entries, shared by `apply` and the engine: the method
    exists and is per-layer, handles the module's type, and accepts this module and its settings
    (the method's own ``check``). Raises `WorkbenchError` naming the value and what is allowed.
    """
    method = get_method(choice.method)
    if method.kind != "layer":
        raise WorkbenchError(f"{choice.method!r} is a whole-model step; put it in plan.steps")
    if not isinstance(module, method.layer_types):
        allowed = ", ".join(t.__name__ for t in method.layer_types)
        raise UnsupportedLayerError(f"method {choice.method!r} cannot compress layer {name!r} of type "
                                    f"{type(module).__name__}; it handles: {allowed}")
    if method.check is not None:
        method.check(module, choice.params, name)
    return method


def apply(model: nn.Module, plan: Plan, calibration_inputs: torch.Tensor | None = None,
          structure_only: bool = False) -> nn.Module:
    """A new model with ``plan`` applied; ``model`` is left exactly as it was.

    ``calibration_inputs``: model inputs used by data-aware methods (e.g. activation-aware SVD).
    ``structure_only``: where a method has a ``skeleton`` builder, build only the structure (the
    weights are about to be loaded from a file), skipping decompositions and calibration.
    Raises `WorkbenchError` for an unknown layer or method, a method that does not apply to the
    layer's type, or settings out of range.
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

    def builder(method):
        return method.skeleton if structure_only and method.skeleton is not None else method.build

    needing = [name for name, _, method, _ in entries if method.needs_inputs and builder(method) is method.build]
    if any(choice.params.get("sequential") for name, _, method, choice in entries if name in needing):
        if calibration_inputs is None:
            raise WorkbenchError(f"layers {needing} use sequential calibration; pass calibration_inputs to apply()")
        return build_in_order(new, entries, calibration_inputs).eval()
    layer_inputs: dict[str, torch.Tensor] = {}
    if needing:
        if calibration_inputs is None:
            raise WorkbenchError(
                f"layers {needing} use a data-aware method; pass calibration_inputs to apply()")
        layer_inputs = collect_layer_inputs(new, needing, calibration_inputs)

    built = [(name, builder(method)(module, choice.params, LayerContext(name, layer_inputs.get(name))))
             for name, module, method, choice in entries]
    for name, replacement in built:
        set_submodule(new, name, replacement)
    return new.eval()
