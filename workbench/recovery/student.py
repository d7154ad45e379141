"""A student built from scratch: a narrower network of the teacher's family, sized to a parameter
budget, trained by distillation. It answers "compress then fine-tune, or distil into a small
model of the same size?".

`build_student` handles ``nn.Sequential`` stacks of Linear / Conv2d layers with shape-free layers
between them (activations, pooling, Flatten, Unflatten, Dropout): every hidden width (the output
of each Linear/Conv2d but the last) is multiplied by one factor ``f``, and ``f`` is the largest
that keeps the student's parameter count within the budget.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.measure import count_params
from workbench.recovery.finetune import distill_finetune, finetune

_SHAPE_FREE = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.Identity, nn.Dropout,
               nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten)


def _check_family(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Sequential):
        raise UnsupportedLayerError(
            f"build_student handles nn.Sequential stacks of Linear/Conv2d layers; got {type(model).__name__}")
    children = list(model.named_children())
    for name, child in children:
        if isinstance(child, nn.Conv2d) and child.groups != 1:
            raise UnsupportedLayerError(f"layer {name!r} is a grouped conv; build_student needs groups=1")
        if not isinstance(child, (nn.Linear, nn.Conv2d) + _SHAPE_FREE):
            raise UnsupportedLayerError(
                f"layer {name!r} ({type(child).__name__}) is not a Linear, Conv2d or shape-free layer; "
                "build_student cannot narrow it")
    if not any(isinstance(c, (nn.Linear, nn.Conv2d)) for _, c in children):
        raise UnsupportedLayerError("the model has no Linear or Conv2d layer to narrow")
    return children


def narrowed(model: nn.Module, factor: float) -> nn.Sequential:
    """A freshly initialised copy of ``model`` with hidden widths ``max(1, round(factor * width))``."""
    children = _check_family(model)
    matrix = [i for i, (_, c) in enumerate(children) if isinstance(c, (nn.Linear, nn.Conv2d))]
    layers = []
    old_width = new_width = None  # channels/features entering the next matrix layer
    for i, (name, child) in enumerate(children):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            old_in = child.in_features if isinstance(child, nn.Linear) else child.in_channels
            if old_width is None:
                new_in = old_in
            elif old_in == old_width:
                new_in = new_width
            elif old_in % old_width == 0:  # flattened (channels, h, w) -> features
                new_in = new_width * (old_in // old_width)
            else:
                raise UnsupportedLayerError(
                    f"cannot follow widths into layer {name!r}: {old_in} inputs after {old_width} channels")
            old_out = child.out_features if isinstance(child, nn.Linear) else child.out_channels
            new_out = old_out if i == matrix[-1] else max(1, int(round(factor * old_out)))
            if isinstance(child, nn.Linear):
                layer = nn.Linear(new_in, new_out, bias=child.bias is not None)
            else:
                layer = nn.Conv2d(new_in, new_out, child.kernel_size, stride=child.stride,
                                  padding=child.padding, dilation=child.dilation,
                                  bias=child.bias is not None, padding_mode=child.padding_mode)
            layers.append((name, layer.to(child.weight.device)))
            old_width, new_width = old_out, new_out
        else:
            layers.append((name, copy.deepcopy(child)))
    return nn.Sequential(OrderedDict(layers))


def build_student(model: nn.Module, params: int, seed: int = 0) -> nn.Sequential:
    """The widest narrowed copy of ``model`` with at most ``params`` parameters, freshly initialised.

    ``params``: the budget (e.g. ``count_params`` of a compressed model). Raises `WorkbenchError`
    when even width 1 does not fit or the budget is not below the teacher's size.
    """
    if isinstance(params, bool) or not isinstance(params, int) or params < 1:
        raise WorkbenchError(f"params={params!r} must be a positive integer (the student's weight budget)")
    full = count_params(model)
    if params >= full:
        raise WorkbenchError(f"params={params} is not below the teacher's {full}; a student must be smaller")
    smallest = count_params(narrowed(model, 0.0))
    if params < smallest:
        raise WorkbenchError(f"params={params} is below the smallest student of this family ({smallest})")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if count_params(narrowed(model, mid)) <= params:
            lo = mid
        else:
            hi = mid
    torch.manual_seed(seed)
    return narrowed(model, lo)


def train_student(task, params: int, *, epochs: int = 40, lr: float = 2e-3, distill: bool = True,
                  temperature: float = 4.0, alpha: float = 0.9, seed: int = 0, **options):
    """Build a student within ``params`` weights and train it from scratch on ``task``'s training split.

    ``distill``: learn from ``task.model`` as teacher (soft loss at ``temperature`` mixed by
    ``alpha``) or from the labels alone. Returns a `workbench.recovery.finetune.Recovery`.
    """
    student = build_student(task.model, params, seed=seed)
    options.setdefault("patience", None)
    if distill:
        return distill_finetune(student, task, epochs=epochs, lr=lr, temperature=temperature, alpha=alpha,
                                seed=seed, **options)
    return finetune(student, task, epochs=epochs, lr=lr, seed=seed, desc="training student", **options)
