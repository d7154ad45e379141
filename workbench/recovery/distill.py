"""Knowledge distillation (Hinton, Vinyals & Dean 2015; FitNets, Romero et al. 2015).

Output distillation: the student matches the teacher's softened class distribution,
``soft = T^2 * KL(softmax(t / T) || softmax(s / T))`` (the ``T^2`` keeps its gradient on the same
scale as the hard loss when T changes), mixed with the hard-label cross-entropy:
``loss = alpha * soft + (1 - alpha) * hard``. Intermediate distillation: chosen hidden activations
of the student match the teacher's through a learned linear adapter where the widths differ,
``feature = mean ||adapter(h_s) - h_t||^2``; the adapters exist only while training.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise WorkbenchError(f"temperature={temperature!r} must be a number > 0 (1 = plain softmax)")
    return float(temperature)


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise WorkbenchError(
            f"alpha={alpha!r} must be in [0, 1] (weight of the soft teacher loss; 1 - alpha weights the labels)")
    return float(alpha)


def check_shapes(student_out: torch.Tensor, teacher_out: torch.Tensor) -> None:
    if student_out.shape != teacher_out.shape:
        raise WorkbenchError(
            f"teacher outputs {tuple(teacher_out.shape)} do not match student outputs "
            f"{tuple(student_out.shape)}; distillation needs the same output shape (same classes)")


def soft_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_t || p_s)`` with ``p = softmax(logits / T)``, averaged over the batch.

    ``student_logits, teacher_logits: (n, classes)``; returns a scalar (nats).
    """
    check_shapes(student_logits, teacher_logits)
    t = check_temperature(temperature)
    log_ps = F.log_softmax(student_logits / t, dim=-1)
    log_pt = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * t * t


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Shifted next-token cross-entropy (nats, mean over the ``n (T - 1)`` predictions): the
    logits ``(n, T, V)`` at position ``t`` score the token ids ``(n, T)`` at ``t + 1``."""
    if logits.dim() != 3 or tuple(ids.shape) != tuple(logits.shape[:2]) or ids.shape[1] < 2:
        raise WorkbenchError(f"next-token loss needs logits (n, T, V) and token ids (n, T) with T >= 2; "
                             f"got logits {tuple(logits.shape)} and ids {tuple(ids.shape)}")
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1).long())


def hard_loss(outputs: torch.Tensor, targets: torch.Tensor, causal_lm: bool = False) -> torch.Tensor:
    """Cross-entropy for class labels ``(n,)`` int; mean squared error for float targets;
    ``causal_lm``: `next_token_loss` of logits ``(n, T, V)`` against the token ids ``(n, T)``."""
    if causal_lm:
        return next_token_loss(outputs, targets)
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 4.0, alpha: float = 0.9, causal_lm: bool = False) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher || student at T) + (1 - alpha) * CE(student, targets)``.

    ``causal_lm``: logits ``(n, T, V)``; the soft loss is averaged over the ``n T`` token
    distributions and the hard loss is `next_token_loss` against the ids ``(n, T)``."""
    a = check_alpha(alpha)
    if causal_lm:
        check_shapes(student_logits, teacher_logits)
        vocab = student_logits.shape[-1]
        soft = soft_loss(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), temperature)
    else:
        soft = soft_loss(student_logits, teacher_logits, temperature)
    if a == 1.0:
        return soft
    return a * soft + (1.0 - a) * hard_loss(student_logits, targets, causal_lm)


@dataclass
class Distillation:
    """How to distil: the ``teacher`` (kept frozen, never modified), ``temperature`` T > 0,
    ``alpha`` in [0, 1] (soft-loss weight), and optional ``features``: ``{student layer: teacher
    layer}`` whose outputs are matched with weight ``feature_weight``."""

    teacher: nn.Module
    temperature: float = 4.0
    alpha: float = 0.9
    features: Mapping[str, str] = field(default_factory=dict)
    feature_weight: float = 1.0

    def __post_init__(self):
        check_temperature(self.temperature)
        check_alpha(self.alpha)
        if not isinstance(self.teacher, nn.Module):
            raise WorkbenchError(f"teacher must be an nn.Module, got {type(self.teacher).__name__}")
        if self.feature_weight < 0:
            raise WorkbenchError(f"feature_weight={self.feature_weight} must be >= 0")


class _Capture:
    """Forward hooks storing the outputs of named modules (``{name: tensor}``) until removed."""

    def __init__(self, model: nn.Module, names: list[str], who: str):
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = []
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                known = ", ".join(n for n, _ in model.named_modules() if n) or "(none)"
                raise WorkbenchError(f"unknown {who} layer {name!r}; layers: {known}") from None
            self.handles.append(module.register_forward_hook(
                lambda mod, args, out, _n=name: self.outputs.__setitem__(_n, out)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _channels_last(h: torch.Tensor) -> torch.Tensor:
    """``(n, c, ...)`` -> ``(n, ..., c)`` so a Linear adapter maps channels; ``(n, d)`` unchanged."""
    return h.movedim(1, -1) if h.dim() > 2 else h


class FeatureMatcher(nn.Module):
    """Matches student activations to teacher activations through learned linear adapters.

    ``pairs``: ``{student layer: teacher layer}``. Call `attach`, run both models, then `loss()`:
    the sum over pairs of ``mean((adapter(h_s) - h_t)^2)``, where ``adapter`` maps the student's
    channel width to the teacher's (``nn.Identity`` when they are equal). Adapters are built lazily
    from the first batch's widths; spatial/sequence sizes must agree.
    """

    def __init__(self, pairs: Mapping[str, str]):
        super().__init__()
        self.pairs = dict(pairs)
        self.adapters = nn.ModuleDict()
        self._student: _Capture | None = None
        self._teacher: _Capture | None = None

    @staticmethod
    def _key(name: str) -> str:
        return re.sub(r"\W", "_", name) or "_root"

    def adapter(self, student_layer: str) -> nn.Module:
        """The adapter applied to ``student_layer``'s output (after `build`)."""
        return self.adapters[self._key(student_layer)]

    def attach(self, student: nn.Module, teacher: nn.Module) -> None:
        self._student = _Capture(student, list(self.pairs), "student")
        self._teacher = _Capture(teacher, list(self.pairs.values()), "teacher")

    def detach(self) -> None:
        for capture in (self._student, self._teacher):
            if capture is not None:
                capture.remove()
        self._student = self._teacher = None

    def build(self) -> None:
        """Create the adapters from the widths seen in the last forward pass of both models."""
        for s_name, t_name in self.pairs.items():
            h_s = _channels_last(self._student.outputs[s_name])
            h_t = _channels_last(self._teacher.outputs[t_name])
            if h_s.shape[:-1] != h_t.shape[:-1]:
                raise WorkbenchError(
                    f"student layer {s_name!r} output {tuple(h_s.shape)} and teacher layer {t_name!r} "
                    f"output {tuple(h_t.shape)} differ beyond the channel width; pick matching layers")
            key = self._key(s_name)
            if key not in self.adapters:
                width_s, width_t = h_s.shape[-1], h_t.shape[-1]
                self.adapters[key] = (nn.Identity() if width_s == width_t
                                      else nn.Linear(width_s, width_t, bias=False).to(h_s.device))

    def loss(self) -> torch.Tensor:
        total = None
        for s_name, t_name in self.pairs.items():
            h_s = _channels_last(self._student.outputs[s_name])
            total = torch.zeros((), device=h_s.device) if total is None else total
            h_t = _channels_last(self._teacher.outputs[t_name]).detach()
            total = total + F.mse_loss(self.adapter(s_name)(h_s), h_t)
        return total
