"""Running a model with forward pre-hooks on named layers: what enters each layer.

Used by data-aware methods (activation-aware SVD, int8 calibration reports), the engine's
preview, and rank allocation (Gram matrices accumulated without storing the inputs).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from workbench.adapters import matrix_kind
from workbench.device import model_device, to_device


@torch.no_grad()
def feed_layers(model: nn.Module, names: list[str], inputs: torch.Tensor,
                on_input: Callable[[str, nn.Module, torch.Tensor], None], batch_size: int = 256) -> None:
    """Run ``model`` (in eval mode) on ``inputs`` in batches, calling ``on_input(name, module, x)``
    with the input ``x`` entering each named layer. Hooks are removed and the mode restored after.
    Each batch runs on the model's device (so ``x`` is there too)."""
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, _name=name: on_input(_name, mod, args[0].detach())) for name in names]
    was_training = model.training
    device = model_device(model)
    model.eval()
    try:
        for start in range(0, len(inputs), batch_size):
            model(to_device(inputs[start:start + batch_size], device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def collect_layer_inputs(model: nn.Module, names: list[str], inputs: torch.Tensor,
                         batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Inputs entering each named layer when ``model`` runs on ``inputs``.

    Returns ``{name: (tokens, in_features)}`` for Linear and ``transformers`` Conv1D layers (leading
    dims flattened) and the raw ``(n, c, h, w)`` input for convolutions, on the model's device.
    """
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def keep(name: str, module: nn.Module, x: torch.Tensor) -> None:
        seen[name].append(x.reshape(-1, x.shape[-1]) if matrix_kind(module) == "linear" else x)

    feed_layers(model, names, inputs, keep, batch_size)
    return {name: torch.cat(chunks) for name, chunks in seen.items()}
