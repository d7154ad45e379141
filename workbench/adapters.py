"""One adapter per layer type the matrix methods compress: its ``(out, in)`` weight matrix, and the
module the methods build from.

The methods (svd, svd_aware, prune, quant, int8) are written for ``nn.Linear`` and ``nn.Conv2d``.
Any other layer type that is a matrix product reaches them through its adapter: `canonical` gives
the ``nn.Linear`` computing exactly what the layer computes, a NEW module holding a copy of its
weights (the original is never touched), and the methods build their replacement from that.
`workbench.compress.check_layer_choice` does the conversion, so `apply`, sequential calibration and
the engine compress such layers without knowing about them.

* ``nn.Linear``: ``weight: (out, in)``, ``y = x W^T + b``; the matrix is the weight.
* ``nn.Conv2d``: ``weight: (out, in/groups, kh, kw)``; the matrix is ``(out, in*kh*kw)`` (patches).
* ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, ...): ``weight: (in, out)``, ``y = x W + b``,
  a transposed Linear; the matrix is ``W^T: (out, in)``.

Conv1D is recognised by its class name and module (``transformers.``), so this module does not
import transformers. GRU/LSTM layers hold several gate matrices, not one: the ``svd_rnn`` method
handles them (`workbench.methods.recurrent`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Adapter:
    """How one layer type is a weight matrix.

    ``label``: the type as messages name it. ``kind``: ``"linear"`` (input ``(..., in)``, a row
    per token) or ``"conv"`` (input ``(n, c, h, w)``, the matrix acting on unfolded patches).
    ``matrix(module)``: the ``(out, in)`` matrix (conv: ``(out, in/groups*kh*kw)``), a view of the
    weight (no copy). ``equivalent(module)``: the module the methods build from (``module`` itself
    for the types they take as they are).
    """

    label: str
    kind: str
    matches: Callable[[nn.Module], bool]
    matrix: Callable[[nn.Module], torch.Tensor]
    equivalent: Callable[[nn.Module], nn.Module]


def is_transformers_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (or a subclass), without importing transformers."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
               for cls in type(module).__mro__)


def conv1d_as_linear(conv1d: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing ``conv1d``'s ``y = x W + b`` (``W: (in, out)``).

    A new module: ``weight = W^T: (out, in)`` and the bias are copies, on ``conv1d``'s device, in
    its dtype, with its ``requires_grad`` flags and train/eval mode; ``conv1d`` is not modified.
    """
    w = conv1d.weight.detach()
    bias = getattr(conv1d, "bias", None)
    in_features, out_features = w.shape
    # Built on the meta device (no random init to throw away), then given real storage.
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta",
                       dtype=w.dtype).to_empty(device=w.device)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        linear.weight.requires_grad_(conv1d.weight.requires_grad)
        if bias is not None:
            linear.bias.copy_(bias.detach())
            linear.bias.requires_grad_(bias.requires_grad)
    return linear.train(conv1d.training)


def _itself(module: nn.Module) -> nn.Module:
    return module


ADAPTERS: tuple[Adapter, ...] = (
    Adapter("Linear", "linear", lambda m: isinstance(m, nn.Linear), lambda m: m.weight.detach(), _itself),
    Adapter("Conv2d", "conv", lambda m: isinstance(m, nn.Conv2d),
            lambda m: m.weight.detach().reshape(m.out_channels, -1), _itself),
    Adapter("transformers Conv1D", "linear", is_transformers_conv1d, lambda m: m.weight.detach().t(),
            conv1d_as_linear),
)


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter of ``module``'s type, or None when no matrix method handles that type."""
    return next((adapter for adapter in ADAPTERS if adapter.matches(module)), None)


def matrix_kind(module: nn.Module) -> str | None:
    """``"linear"`` (input rows ``(..., in)``), ``"conv"``, or None when no adapter takes ``module``."""
    adapter = adapter_for(module)
    return None if adapter is None else adapter.kind


def canonical(module: nn.Module) -> nn.Module:
    """The module the methods build from: the ``nn.Linear`` equivalent of a layer an adapter
    converts (a new module; see `conv1d_as_linear`), else ``module`` itself."""
    adapter = adapter_for(module)
    return module if adapter is None else adapter.equivalent(module)


def adapted_types() -> str:
    """The layer types the matrix methods take, for messages: ``"Linear, Conv2d, transformers Conv1D"``."""
    return ", ".join(adapter.label for adapter in ADAPTERS)
