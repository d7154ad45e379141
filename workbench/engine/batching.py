"""How the engine feeds the evaluation inputs: batches, the model's own grouping, memory layout."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError


def evaluation_batches(model: nn.Module, inputs: torch.Tensor,
                        batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``(batches, order)``: the model's ``evaluation_batches`` index groups when it declares them
    (``order``: the concatenated indices), else contiguous slices of ``batch_size`` (``order`` None)."""
    grouping = getattr(model, "evaluation_batches", None)
    if not callable(grouping):
        return [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)], None
    groups = [torch.as_tensor(g, dtype=torch.long) for g in grouping(inputs)]
    order = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.long)
    if not torch.equal(order.sort().values, torch.arange(len(inputs))):
        raise WorkbenchError(f"{type(model).__name__}.evaluation_batches must list each of the "
                             f"{len(inputs)} evaluation samples exactly once")
    return [inputs[g] for g in groups], order


@torch.no_grad()
def runs_channels_last(model: nn.Module, example: Any) -> bool:
    """Convert ``model`` (the engine's own copy) to NHWC weights if it still runs that way; a
    forward that needs contiguous NCHW activations (``x.view(n, -1)`` after a conv) keeps NCHW."""
    model.to(memory_format=torch.channels_last)
    try:
        model(to_device(example, model_device(model)))
        return True
    except RuntimeError:
        model.to(memory_format=torch.contiguous_format)
        return False
