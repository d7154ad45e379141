"""Training for pruning: L1-regularised training then thresholding, and iterative pruning to a
target sparsity (prune, fine-tune under the mask, repeat) on an AGP cubic schedule.

Both work on a deep copy of ``task.model`` (the user's model is never touched) and return a
dense trained copy with a `Plan` that, applied to that copy, gives the sparse model.
Classification tasks (cross-entropy on ``task.train_inputs`` / ``task.train_targets``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.compress import apply
from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.kernels import prune as prune_kernels
from workbench.plan import LayerPlan, Plan


@dataclass
class PruningRun:
    """Result of a pruning run: the dense trained copy, the plan to apply to it, and the history.

    ``history``: one dict per step ``{"step", "kept", "metric"}``; ``pruned``: ``apply(model, plan)``.
    """

    model: nn.Module
    plan: Plan
    pruned: nn.Module
    history: list[dict] = field(default_factory=list)


def _check_task(task) -> None:
    if task.train_inputs is None or task.train_targets is None:
        raise WorkbenchError(f"task {task.name!r} has no training split; pruning-aware training needs one")


def _layer_names(model: nn.Module, layers) -> list[str]:
    names = list(layers) if layers is not None else [info.name for info in matrix_layers(model)]
    if not names:
        raise WorkbenchError("the model has no Linear/Conv2d layer to prune")
    return names


def l1_penalty(model: nn.Module, names: list[str]) -> torch.Tensor:
    """``sum |w|`` over the weights of the named layers (biases excluded)."""
    return sum(model.get_submodule(name).weight.abs().sum() for name in names)


def train_epochs(model: nn.Module, task, epochs: int, lr: float = 1e-3, l1: float = 0.0,
                 names: list[str] | None = None, masks: dict[str, torch.Tensor] | None = None,
                 batch_size: int = 64, seed: int = 0, desc: str = "training") -> nn.Module:
    """Train ``model`` in place: Adam on ``cross_entropy + l1 * sum|w|``.

    ``masks``: ``{layer: bool keep-mask}``; pruned weights are held at exactly zero (their
    gradient is zeroed and they are re-zeroed after every step).
    """
    x, y = to_device((task.train_inputs, task.train_targets), model_device(model))
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    masks = masks or {}
    model.train()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            if l1:
                loss = loss + l1 * l1_penalty(model, names or [])
            loss.backward()
            for name, mask in masks.items():
                model.get_submodule(name).weight.grad.mul_(mask)
            optimizer.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    model.get_submodule(name).weight.mul_(mask)
    return model.eval()


def l1_regularised_pruning(task, l1: float = 1e-4, epochs: int = 10, threshold: float = 1e-2,
                           layers=None, lr: float = 1e-3, seed: int = 0) -> PruningRun:
    """Train a copy with ``loss + l1 * sum|w|`` (drives weights towards 0), then cut ``|w| <= threshold``.

    Returns the trained copy, the plan ``{layer: prune(threshold)}`` and the pruned model.
    """
    _check_task(task)
    if not l1 >= 0:
        raise WorkbenchError(f"l1={l1!r} must be >= 0")
    prune_kernels.check_threshold(threshold)
    torch.manual_seed(seed)
    model = copy.deepcopy(task.model)
    names = _layer_names(model, layers)
    train_epochs(model, task, epochs, lr=lr, l1=l1, names=names, seed=seed, desc="L1 training")
    plan = Plan({name: LayerPlan("prune", {"threshold": float(threshold)}) for name in names})
    pruned = apply(model, plan)
    kept = sum(int(model.get_submodule(n).weight.abs().gt(threshold).sum()) for n in names)
    total = sum(model.get_submodule(n).weight.numel() for n in names)
    return PruningRun(model, plan, pruned, [{"step": 1, "kept": kept / total, "metric": task.evaluate(pruned)}])


def iterative_pruning(task, ratio: float, steps: int = 5, epochs_per_step: int = 2, layers=None,
                      lr: float = 1e-3, seed: int = 0) -> PruningRun:
    """Prune gradually to the kept fraction ``ratio``: at step ``t`` keep ``agp_ratios(ratio, steps)[t]``
    of each layer's weights (magnitude), fine-tune ``epochs_per_step`` epochs under the mask, repeat.

    Pruned weights stay exactly zero while the kept ones train. The final plan prunes the
    trained copy by ``threshold=0`` (keeps its non-zero weights, i.e. the final mask).
    """
    _check_task(task)
    prune_kernels.check_ratio(ratio)
    if steps < 1 or epochs_per_step < 0:
        raise WorkbenchError(f"steps={steps} must be >= 1 and epochs_per_step={epochs_per_step} >= 0")
    torch.manual_seed(seed)
    model = copy.deepcopy(task.model)
    names = _layer_names(model, layers)
    history = []
    for step, kept in enumerate(tqdm(prune_kernels.agp_ratios(ratio, steps), desc="iterative pruning"), 1):
        masks = {name: prune_kernels.mask_by_ratio(model.get_submodule(name).weight, kept, name) for name in names}
        with torch.no_grad():
            for name, mask in masks.items():
                model.get_submodule(name).weight.mul_(mask)
        train_epochs(model, task, epochs_per_step, lr=lr, masks=masks, seed=seed + step,
                     desc=f"fine-tune at {kept:.0%} kept")
        history.append({"step": step, "kept": kept, "metric": task.evaluate(model)})
    plan = Plan({name: LayerPlan("prune", {"threshold": 0.0}) for name in names})
    return PruningRun(model, plan, apply(model, plan), history)
