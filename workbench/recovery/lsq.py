"""Quantization-aware training: fake quantization with a straight-through estimator and learned
step sizes (LSQ, Esser et al. 2019, "Learned Step Size Quantization", arXiv:1902.08153).

Weights are kept in float while training and seen through ``w_hat = s * round(clip(w / s, -qn, qp))``.
``round`` has zero gradient almost everywhere, so the backward pass treats it as the identity
(straight-through estimator): ``d w_hat / d w = 1`` inside the clip range, ``0`` outside. The
step ``s`` gets the LSQ gradient ``d w_hat / d s = round(v) - v`` inside (``v = w / s``), ``-qn``
below and ``qp`` above, multiplied by ``g = 1 / sqrt(n_w * qp)`` to balance its update against the
weights'. Training starts from post-training quantization (PTQ): the codes and scales the
``quant`` method produced. After training the layer is re-packed into integer codes.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.recovery.masked import dense_forward


# ---------------------------------------------------------------- functional core (pure tensors)
def ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` forward (exactly: ``value + 0``), the gradient of ``x`` backward (straight-through)."""
    return value.detach() + (x - x.detach())


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward (exact integers), identity backward (straight-through estimator)."""
    return ste(x, torch.round(x))


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward; its gradient multiplied by ``g`` backward (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def signed_range(bits: int) -> tuple[int, int]:
    """``(qn, qp)`` of signed ``bits``-bit codes: integers in ``[-qn, qp] = [-2^(b-1), 2^(b-1)-1]``."""
    check_bits(bits)
    return 2 ** (bits - 1), 2 ** (bits - 1) - 1


def check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise WorkbenchError(f"bits={bits!r} must be an integer from 2 to 8")


def lsq_fake_quant(w: torch.Tensor, scale: torch.Tensor, qn: int, qp: int,
                   g: float | None = None) -> torch.Tensor:
    """Fake-quantized ``w``: ``s * round(clip(w / s, -qn, qp))`` with STE and LSQ gradients.

    ``w: (out, ...)``; ``scale``: a scalar or one step per output channel, broadcastable to
    ``w`` (e.g. ``(out, 1)``); ``g``: gradient scale of the step (None: 1 / sqrt(numel per step * qp)).
    """
    if g is None:
        g = 1.0 / math.sqrt(max(w.numel() // max(scale.numel(), 1), 1) * max(qp, 1))
    s = grad_scale(scale, g)
    return round_ste(torch.clamp(w / s, -qn, qp)) * s


def codes_of(w: torch.Tensor, scale: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """Integer codes ``round(clip(w / s, -qn, qp))`` as int8 (no gradient)."""
    return torch.clamp(torch.round(w.detach() / scale.detach()), -qn, qp).to(torch.int8)


def mse_scale(w: torch.Tensor, qn: int, qp: int, per_channel: bool = True, grid: int = 64) -> torch.Tensor:
    """PTQ step(s) minimising ``||w - fake_quant(w)||^2`` over clip ratios in (0, 1] of max|w|.

    Returns ``(out, 1, ...)`` steps when ``per_channel`` (one per output row), else a scalar.
    """
    flat = w.detach().reshape(w.shape[0], -1) if per_channel else w.detach().reshape(1, -1)
    top = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / max(qp, 1)
    best, best_err = top.clone(), torch.full_like(top, float("inf"))
    for ratio in torch.linspace(1.0 / grid, 1.0, grid):
        s = top * ratio
        err = ((torch.clamp(torch.round(flat / s), -qn, qp) * s - flat) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    if per_channel:
        return best.reshape(w.shape[0], *([1] * (w.dim() - 1)))
    return best.reshape(())


# ---------------------------------------------------------------- modules
class QuantView(nn.Module):
    """Base of the fake-quantization training views: each holds its step(s) as the parameter
    ``scale`` (learned, or frozen by `set_learn_scales`) and defines ``repack() -> packed layer``."""


class FakeQuantLayer(QuantView):
    """Training view of a weight-quantized Linear/Conv2d (float weights, integer-grid forward).

    ``layer``: float ``nn.Linear``/``nn.Conv2d`` whose weight starts at the dequantized PTQ weight;
    ``scale``: scalar or per-output-channel step ``(out, 1, ...)``; codes lie in ``[-qn, qp]``
    (default the full signed ``bits``-bit range; pass ``qn = qp = 2^(b-1) - 1`` for the restricted
    symmetric grid of PTQ).
    ``learn_scale``: train the step with LSQ (QAT) or keep the PTQ step fixed (plain fine-tuning
    through the STE). ``pack(codes: int8 like weight, scale, bias, layer) -> compact module``
    re-packs into integer storage (``QuantLinear.from_signed_codes`` with ``bits`` bound).
    """

    def __init__(self, layer: nn.Module, scale: torch.Tensor, bits: int, qn: int | None = None,
                 qp: int | None = None, learn_scale: bool = True, pack: Callable[..., nn.Module] | None = None):
        super().__init__()
        full_qn, full_qp = signed_range(bits)
        self.bits = bits
        self.qn = full_qn if qn is None else int(qn)
        self.qp = full_qp if qp is None else int(qp)
        if not (0 < self.qn <= full_qn and 0 <= self.qp <= full_qp):
            raise WorkbenchError(f"codes [-{self.qn}, {self.qp}] do not fit signed bits={bits}")
        self.layer = layer
        self.scale = nn.Parameter(scale.detach().clone().to(layer.weight.dtype), requires_grad=learn_scale)
        self.pack = pack

    def quantized_weight(self) -> torch.Tensor:
        """``(out, ...)`` weight on the integer grid (differentiable through the STE)."""
        return lsq_fake_quant(self.layer.weight, self.scale.abs().clamp_min(1e-12), self.qn, self.qp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_forward(self.layer, x, self.quantized_weight())

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """int8 codes of the current weights, shape of ``layer.weight``."""
        return codes_of(self.layer.weight, self.scale.abs().clamp_min(1e-12), self.qn, self.qp)

    @torch.no_grad()
    def repack(self) -> nn.Module:
        """The compact packed layer (needs ``pack``); a view without one cannot be exported."""
        if self.pack is None:
            raise WorkbenchError("this fake-quant view has no packer; pass pack= to store integer codes")
        scale = self.scale.detach().abs().clamp_min(1e-12)
        return self.pack(self.codes(), scale, self.layer.bias, self.layer)

    @classmethod
    def from_float(cls, layer: nn.Module, bits: int, per_channel: bool = True,
                   learn_scale: bool = True, pack: Callable[..., nn.Module] | None = None) -> "FakeQuantLayer":
        """PTQ (MSE-optimal step, signed ``bits``-bit codes) of a float layer, as a trainable view.

        ``layer`` is copied, never modified.
        """
        qn, qp = signed_range(bits)
        scale = mse_scale(layer.weight, qn, qp, per_channel)
        view = cls(copy.deepcopy(layer), scale, bits, qn, qp, learn_scale, pack)
        with torch.no_grad():
            view.layer.weight.copy_(view.codes().to(scale.dtype) * scale)
        return view

    def extra_repr(self) -> str:
        return f"codes in [-{self.qn}, {self.qp}], learn_scale={self.scale.requires_grad}"


def set_learn_scales(model: nn.Module, learn: bool) -> None:
    """Train (QAT) or freeze (plain STE fine-tuning) the steps of every fake-quant view in ``model``."""
    for module in model.modules():
        if isinstance(module, QuantView):
            module.scale.requires_grad_(learn)
