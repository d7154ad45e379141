"""Magnitude-pruning kernels: masks by threshold or kept fraction, per layer or global; AGP schedule.

A mask is a bool tensor shaped like the weight, ``True`` = kept. Magnitude pruning keeps the
weights with the largest ``|w|``. Conventions used throughout:

- ``ratio``: the KEPT fraction of weights, in ``(0, 1]`` (``ratio=0.2`` is 80% sparsity).
- ``threshold``: weights with ``|w| > threshold`` are kept (``threshold=0`` keeps every non-zero).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from workbench.errors import WorkbenchError


def check_ratio(ratio: float, name: str = "") -> float:
    """Raise `WorkbenchError` unless ``0 < ratio <= 1`` (the kept fraction of weights)."""
    where = f" for layer {name!r}" if name else ""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1):
        raise WorkbenchError(f"ratio={ratio!r}{where} must be in (0, 1]: it is the kept fraction of weights")
    return float(ratio)


def check_threshold(threshold: float, name: str = "") -> float:
    where = f" for layer {name!r}" if name else ""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise WorkbenchError(f"threshold={threshold!r}{where} must be a number >= 0 (weights with |w| > threshold are kept)")
    return float(threshold)


def check_not_empty(mask: torch.Tensor, name: str = "", setting: str = "") -> None:
    """Raise `WorkbenchError` when ``mask`` keeps no weight at all (the layer would be removed)."""
    if not bool(mask.any()):
        where = f" of layer {name!r}" if name else ""
        raise WorkbenchError(f"{setting or 'this setting'} prunes every weight{where} "
                             f"({mask.numel()} weights); keep at least one (lower the threshold or raise ratio)")


def kept_count(numel: int, ratio: float) -> int:
    """Weights kept at ``ratio``: ``round(ratio * numel)``, at least 1."""
    return max(1, min(numel, int(round(ratio * numel))))


def mask_by_threshold(w: torch.Tensor, threshold: float, name: str = "") -> torch.Tensor:
    """``|w| > threshold`` (bool, shape of ``w``); raises if nothing would be kept."""
    check_threshold(threshold, name)
    mask = w.detach().abs() > threshold
    check_not_empty(mask, name, f"threshold={threshold:g}")
    return mask


def mask_by_ratio(w: torch.Tensor, ratio: float, name: str = "") -> torch.Tensor:
    """Keep the ``kept_count(w.numel(), ratio)`` largest ``|w|`` (ties broken by position)."""
    check_ratio(ratio, name)
    flat = w.detach().abs().reshape(-1)
    k = kept_count(flat.numel(), ratio)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.reshape(w.shape)


def global_threshold(weights: Mapping[str, torch.Tensor], ratio: float) -> float:
    """The magnitude cut keeping the fraction ``ratio`` of all weights pooled together.

    Returns ``t`` such that ``|w| > t`` keeps ``kept_count(total, ratio)`` weights (up to ties).
    """
    check_ratio(ratio)
    pooled = torch.cat([w.detach().abs().reshape(-1) for w in weights.values()])
    k = kept_count(pooled.numel(), ratio)
    if k == pooled.numel():
        return 0.0  # keep every non-zero weight
    # the (numel - k)-th smallest magnitude is the largest one removed
    return float(torch.kthvalue(pooled, pooled.numel() - k).values)


def global_masks(weights: Mapping[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Masks of a global magnitude cut over all ``weights`` (``{name: (out, ...)}``)."""
    t = global_threshold(weights, ratio)
    return {name: mask_by_threshold(w, max(t, 0.0), name) for name, w in weights.items()}


def sparsity(mask: torch.Tensor) -> float:
    """Fraction of weights removed (``1 - kept / numel``)."""
    return 1.0 - float(mask.sum()) / mask.numel()


def agp_sparsity(step: int, n_steps: int, final_sparsity: float, initial_sparsity: float = 0.0) -> float:
    """Automated gradual pruning (Zhu & Gupta 2017, arXiv:1710.01878), cubic schedule.

    ``s_t = s_f + (s_i - s_f) * (1 - t / n)^3`` for ``t = 0..n``: fast pruning early, slow late.
    """
    if n_steps < 1:
        raise WorkbenchError(f"n_steps={n_steps} must be at least 1")
    if not 0 <= step <= n_steps:
        raise WorkbenchError(f"step={step} must be in 0..n_steps={n_steps}")
    if not (0 <= initial_sparsity <= final_sparsity < 1):
        raise WorkbenchError(f"sparsities must satisfy 0 <= initial={initial_sparsity} <= final={final_sparsity} < 1")
    return final_sparsity + (initial_sparsity - final_sparsity) * (1 - step / n_steps) ** 3


def agp_ratios(final_ratio: float, n_steps: int) -> list[float]:
    """Kept fractions after each of ``n_steps`` AGP steps, ending exactly at ``final_ratio``."""
    check_ratio(final_ratio)
    return [1.0 - agp_sparsity(t, n_steps, 1.0 - final_ratio) for t in range(1, n_steps + 1)]


def l1_norms_of_rows(w: torch.Tensor) -> torch.Tensor:
    """``(out,)`` L1 norm of each output row/channel of ``w: (out, ...)`` (structured importance)."""
    return w.detach().abs().reshape(w.shape[0], -1).sum(dim=1)


def weakest_rows(w: torch.Tensor, ratio: float, name: str = "") -> list[int]:
    """Indices of output rows removed when keeping ``ceil(ratio * out)`` rows of largest L1 norm."""
    check_ratio(ratio, name)
    out = w.shape[0]
    keep = max(1, math.ceil(ratio * out - 1e-9))
    order = torch.argsort(l1_norms_of_rows(w), descending=True, stable=True)
    return sorted(int(i) for i in order[keep:])
