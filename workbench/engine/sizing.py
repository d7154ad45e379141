"""Sizes of one layer's choice: parameters, state-dict bytes and FLOPs, cheaply."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.measure import count_flops
from workbench.plan import LayerPlan
from workbench.registry import get_method
from workbench.ties import payload_bytes


def state_bytes(module: nn.Module) -> int:
    """Tensor payload of ``module.state_dict()`` in bytes, each tied (shared) tensor once."""
    return payload_bytes(module.state_dict())


def rank_settings(choice: LayerPlan | None) -> dict[str, int]:
    """``{setting: rank}`` of ``choice``'s integer rank settings (its method's ``rank_params``)."""
    if choice is None:
        return {}
    names = get_method(choice.method).rank_params
    return {p: v for p, v in choice.params.items() if p in names and isinstance(v, int) and not isinstance(v, bool)}


@torch.no_grad()
def layer_flops(module: nn.Module, example: Any) -> int:
    """FLOPs of ``module(example)`` as ``torch.utils.flop_counter`` counts them.

    Modules whose weighted leaves are all ``nn.Linear`` / ungrouped-or-grouped ``nn.Conv2d`` (dense
    and low-rank layers) are counted by formula from one hooked run (``2 * tokens * in * out``;
    ``2 * numel(output) * in/groups * kh * kw``), which is what the counter reports for them but
    ~20x cheaper; anything else goes through `workbench.measure.count_flops`.
    """
    leaves = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    if not leaves or any(type(m) not in (nn.Linear, nn.Conv2d) for m in leaves):
        return count_flops(module, example)
    total = 0

    def hook(mod, args, out):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += 2 * (args[0].numel() // mod.in_features) * mod.in_features * mod.out_features
        else:
            total += 2 * out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]

    handles = [leaf.register_forward_hook(hook) for leaf in leaves]
    try:
        module(example)
    finally:
        for handle in handles:
            handle.remove()
    return total
