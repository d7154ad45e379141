"""Sequential (progressive) calibration: build a plan's layers in forward order.

One-shot calibration (`workbench.apply` default) fits every data-aware layer to the inputs it sees
in the ORIGINAL model. Once earlier layers are compressed, later layers see different inputs and
the errors add up. Sequential calibration (SVD-LLM / ASVD / GPTQ practice) instead builds the
layers in the order the forward pass reaches them, and gives each builder:

* ``LayerContext.inputs``: the layer's inputs ``X'`` in the model whose earlier layers are ALREADY
  compressed (Linear: ``(tokens, in)``; Conv2d: ``(n, c, h, w)``);
* ``LayerContext.reference_inputs``: the same positions' inputs ``X`` in the original model, so a
  builder can fit the ORIGINAL outputs ``W X^T`` from ``X'`` (``svd_aware`` with ``refit``).

Cost. The model is cut into stages (`workbench.auto_stages.find_stages` on the first calibration
inputs: MiniLM's declared encoder blocks; the blocks of a user's BERT / GPT-2 / Llama or residual
network, cut automatically; else one stage, the whole model; also one stage when a layer of the
plan belongs to no automatic stage). Per stage, the original runs once (recording ``X`` for
all its layers), and the compressed copy runs once per *group* of layers whose inputs do not
depend on one another (q, k, v share one input tensor), each run stopped as soon as it reaches a
layer whose input would be stale. For MiniLM that is about four forward passes in all; with one
stage, it is one (partial) forward pass per group of every block.

A plan asks for this with ``"sequential": True`` in a data-aware layer's settings; `apply` then
builds the whole plan here. The result is deterministic (same plan, model and calibration inputs
give the same weights), so a plan stays data: applying it again reproduces the model.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from workbench.adapters import matrix_kind
from workbench.auto_stages import find_stages
from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError
from workbench.inventory import set_submodule
from workbench.registry import LayerContext
from workbench.stages import Stage, model_stages

BATCH = 64  # calibration samples per forward chunk
EXAMPLE = 2  # calibration samples the automatic stage cut is checked on


class _Stop(Exception):
    """Raised inside a forward pre-hook to end a stage run early (the rest would be stale)."""


def _flatten(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    return x.reshape(-1, x.shape[-1]) if matrix_kind(module) == "linear" else x


def _run(stage, model: nn.Module, state: Any) -> Any:
    try:
        return stage.run(model, state)
    except _Stop:
        return None


def _record_all(stage, model: nn.Module, states: list, names: list[str]) -> tuple[list, dict]:
    """Run ``stage`` of ``model`` on every chunk; return (next states, ``{name: inputs}``)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, _n=name: seen[_n].append(_flatten(mod, args[0]))) for name in names]
    try:
        nxt = [stage.run(model, state) for state in states]
    finally:
        for handle in handles:
            handle.remove()
    return nxt, {name: torch.cat(chunks) for name, chunks in seen.items() if chunks}


def _record_fresh(stage, model: nn.Module, states: list, pending: list[str]) -> dict[str, torch.Tensor]:
    """Inputs of the pending layers that no other pending layer influences, ``{name: inputs}``.

    An input is *fresh* if it arrives before any pending layer has produced an output in this run,
    or is the very tensor a fresh input already was (q, k, v reading one hidden state). The run
    stops at the first stale input: everything after it would change once that layer is built.
    """
    captured: dict[str, list[torch.Tensor]] = {}
    for state in states:
        fresh_tensors: list[torch.Tensor] = []
        finished = [False]

        def pre(mod, args, _n):
            x = args[0]
            if finished[0] and not any(x is t for t in fresh_tensors):
                raise _Stop
            fresh_tensors.append(x)
            captured.setdefault(_n, []).append(_flatten(mod, x))

        def post(mod, args, out):
            finished[0] = True

        handles = []
        for name in pending:
            module = model.get_submodule(name)
            handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: pre(m, a, _n)))
            handles.append(module.register_forward_hook(post))
        try:
            _run(stage, model, state)
        finally:
            for handle in handles:
                handle.remove()
    counts = {name: len(chunks) for name, chunks in captured.items()}
    # A layer is ready when every chunk recorded it the same number of times.
    return {name: torch.cat(chunks) for name, chunks in captured.items()
            if counts[name] % len(states) == 0}


def calibration_stages(model: nn.Module, example: Any, layers: list[str]) -> list[Stage]:
    """The stages `find_stages` gives on ``example``; the declared ones (`model_stages`: one stage,
    the whole model, for a user's model) when a layer of ``layers`` belongs to no automatic stage."""
    stages = find_stages(model, example).stages
    if all(any(stage.owns(name) for stage in stages) for name in layers):
        return stages
    return model_stages(model)


@torch.no_grad()
def build_in_order(model: nn.Module, entries: list, calibration_inputs: torch.Tensor,
                   batch_size: int = BATCH) -> nn.Module:
    """Build ``entries`` (``(name, module, method, choice)`` as in `apply`) into ``model`` in order.

    ``model`` is the caller's working copy (modified in place and returned); a second copy keeps
    the original weights for the reference inputs. ``calibration_inputs``: ``(n, ...)`` model
    inputs, run in chunks of ``batch_size`` on the model's device.
    """
    refit = any(choice.params.get("refit") for _, _, _, choice in entries)
    reference = copy.deepcopy(model).eval() if refit else None
    model.eval()
    calibration_inputs = to_device(calibration_inputs, model_device(model))
    stages = calibration_stages(model, calibration_inputs[:EXAMPLE], [name for name, *_ in entries])
    states = list(calibration_inputs.split(batch_size))
    ref_states = list(states)
    todo = {name: (method, choice) for name, _, method, choice in entries}
    for stage in stages:
        owned = [name for name in todo if stage.owns(name)]
        reference_inputs: dict[str, torch.Tensor] = {}
        if owned and reference is not None:
            ref_states, reference_inputs = _record_all(stage, reference, ref_states, owned)
        elif reference is not None:
            ref_states = [stage.run(reference, state) for state in ref_states]
        if owned:
            pending = list(owned)
            while pending:
                fresh = _record_fresh(stage, model, states, pending)
                if not fresh:
                    raise WorkbenchError(f"layers {pending} were never reached by the calibration inputs "
                                         f"in stage {stage.label!r}; they cannot be calibrated")
                for name in [n for n in pending if n in fresh]:
                    method, choice = todo.pop(name)
                    context = LayerContext(name, fresh[name], reference_inputs.get(name))
                    set_submodule(model, name, method.build(model.get_submodule(name), choice.params, context))
                    pending.remove(name)
        states = [stage.run(model, state) for state in states]
    if todo:
        raise WorkbenchError(f"layers {sorted(todo)} belong to no stage of the model; cannot build them in order")
    return model
