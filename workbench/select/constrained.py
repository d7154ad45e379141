"""Convex constrained compression of one Linear layer of a task's model, against magnitude pruning.

The layer's calibration inputs (training data, never the test split) give ``x: (t, in)`` and the
original outputs ``y = x W^T`` (bias kept as it is); both methods reach the same sparsity, and
each is judged by the relative output error on those inputs and by the task metric on the test
data. The accuracy is measured on a copy whose weight holds the zeros (a measurement; the sparse
storage itself is the pruning family's job).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from workbench.hooks import collect_layer_inputs
from workbench.errors import UnsupportedLayerError
from workbench.inventory import get_submodule
from workbench.kernels import convex
from workbench.zoo.task import Task


def _metric_with_weight(task: Task, name: str, weight: torch.Tensor) -> float:
    model = copy.deepcopy(task.model)
    with torch.no_grad():
        model.get_submodule(name).weight.copy_(weight)
    return float(task.evaluate(model))


def compare_on_layer(task: Task, name: str, sparsity: float, constraint: str = "l1",
                     n_inputs: int = 1024) -> dict:
    """``{"layer", "sparsity", "convex": {...}, "magnitude": {...}}``, each with
    ``output_error`` (relative, on calibration inputs) and ``metric`` (test data)."""
    module = get_submodule(task.model, name)
    if not isinstance(module, nn.Linear):
        raise UnsupportedLayerError(f"layer {name!r} is a {type(module).__name__}; the convex refit handles nn.Linear")
    x = collect_layer_inputs(task.model, [name], task.calibration_inputs(n_inputs))[name]
    w = module.weight.detach()
    y = x @ w.T
    refit = convex.constrained_prune(x, y, w, sparsity, constraint=constraint)
    magnitude = w * convex.magnitude_mask(w, sparsity)
    return {
        "layer": name, "sparsity": sparsity, "constraint": constraint,
        "nonzeros": int((refit != 0).sum()),
        "convex": {"output_error": convex.relative_output_error(x, y, refit),
                   "metric": _metric_with_weight(task, name, refit)},
        "magnitude": {"output_error": convex.relative_output_error(x, y, magnitude),
                      "metric": _metric_with_weight(task, name, magnitude)},
    }
