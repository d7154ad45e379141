"""Whole-model step ``fuse_embedding``: an nn.Embedding feeding a GRU/LSTM becomes one lookup table.

``LayerPlan("fuse_embedding", {"embedding": "embed", "rnn": "rnn", "rank_hh": None, "per_gate": True})``
(see `workbench.layers.fusion`). The recipe ``fuse_embedding`` finds the pair by running the
task's example input with hooks and checking that the RNN's input *is* the embedding's output.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import get_submodule, set_submodule
from workbench.layers.fusion import fuse_embedding_rnn
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, register_method, register_recipe


def build_fuse(model: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """Replace ``params['embedding']`` by the fused table and ``params['rnn']`` by a fused-input RNN."""
    for key in ("embedding", "rnn"):
        if not isinstance(params.get(key), str):
            raise WorkbenchError(f"fuse_embedding needs {key!r} = a layer name; got {params.get(key)!r}")
    embedding, rnn = get_submodule(model, params["embedding"]), get_submodule(model, params["rnn"])
    lookup, fused = fuse_embedding_rnn(embedding, rnn, params.get("rank_hh"), params.get("per_gate", True),
                                       name=params["rnn"])
    set_submodule(model, params["embedding"], lookup)
    set_submodule(model, params["rnn"], fused)
    return model


register_method(Method("fuse_embedding", build_fuse, (nn.Module,), kind="step",
                       description="embedding x GRU/LSTM input projection -> one lookup table (exact)"))


@torch.no_grad()
def embedding_rnn_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``[(embedding name, rnn name)]`` where the RNN's input tensor is that embedding's output."""
    outputs: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            handles.append(module.register_forward_hook(
                lambda m, a, out, _n=name: outputs.__setitem__(id(out), _n)))
        elif isinstance(module, (nn.GRU, nn.LSTM)):
            handles.append(module.register_forward_pre_hook(
                lambda m, a, _n=name: pairs.append((outputs[id(a[0])], _n)) if id(a[0]) in outputs else None))
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return pairs


def fuse_plan(model: nn.Module, *, task=None, example: torch.Tensor | None = None) -> Plan:
    """Plan fusing every embedding that directly feeds a GRU/LSTM (found with ``task.example_input``)."""
    example = example if example is not None else (task.example_input if task is not None else None)
    if example is None:
        raise WorkbenchError("fuse_embedding needs an example input (task= or example=) to find which "
                             "embedding feeds which RNN")
    pairs = embedding_rnn_pairs(model, example)
    if not pairs:
        raise UnsupportedLayerError("no nn.Embedding whose output goes straight into an nn.GRU/nn.LSTM was "
                                    "found; nothing to fuse")
    return Plan({}, tuple(LayerPlan("fuse_embedding", {"embedding": e, "rnn": r}) for e, r in pairs))


register_recipe("fuse_embedding", fuse_plan)
