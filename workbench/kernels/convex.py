"""Convex constrained refit of a linear map ("convex constrained compression"), with cvxpy.

Given a layer's inputs ``x: (t, n)`` and the outputs to reproduce ``y: (t, m)`` (bias already
removed), find ``w: (m, n)`` minimizing ``||x w^T - y||_F^2`` subject to

- ``"l1"``: ``sum |w| <= radius`` (an L1 ball: a convex surrogate of sparsity), or
- ``"box"``: ``lower <= w <= upper`` elementwise,

then keep the largest entries (``threshold``) and refit the kept ones by least squares. The
objective is written with the Gram matrix ``g = x^T x = l l^T`` as ``||l^T w^T - l^{-1} x^T y||^2``
(equal up to a constant), so its size does not grow with the number of samples ``t``.
"""
from __future__ import annotations

import numpy as np
import torch

from workbench.errors import WorkbenchError


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0 <= sparsity < 1):
        raise WorkbenchError(f"sparsity={sparsity!r} must be in [0, 1) (the fraction of weights set to zero)")
    return float(sparsity)


def _gram_factors(x: np.ndarray, y: np.ndarray, ridge: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """``(lt, z)`` with ``||lt @ wt - z||^2 = ||x wt - y||^2 - const`` (``wt = w^T: (n, m)``)."""
    g = x.T @ x
    g += ridge * (np.trace(g) / len(g) + 1.0) * np.eye(len(g))
    l = np.linalg.cholesky(g)
    z = np.linalg.solve(l, x.T @ y)
    return l.T, z


def constrained_refit(x: torch.Tensor, y: torch.Tensor, constraint: str = "l1", *,
                      radius: float | None = None, lower: float | None = None,
                      upper: float | None = None) -> torch.Tensor:
    """Solve ``min ||x w^T - y||^2`` under ``constraint``; returns ``w: (m, n)`` in ``x``'s dtype.

    ``x: (t, n)`` inputs, ``y: (t, m)`` targets. ``radius`` (> 0) bounds ``sum |w|`` for "l1";
    ``lower < upper`` bound each entry for "box". Raises `WorkbenchError` on bad settings or when
    the solver fails.
    """
    import cvxpy as cp  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise WorkbenchError(f"x: (t, n) and y: (t, m) must share t; got {tuple(x.shape)} and {tuple(y.shape)}")
    lt, z = _gram_factors(_as_numpy(x), _as_numpy(y))
    wt = cp.Variable((x.shape[1], y.shape[1]))
    if constraint == "l1":
        if radius is None or not radius > 0:
            raise WorkbenchError(f"radius={radius!r} must be > 0 for the L1-ball constraint")
        constraints = [cp.sum(cp.abs(wt)) <= radius]
    elif constraint == "box":
        if lower is None or upper is None or not lower < upper:
            raise WorkbenchError(f"box needs lower < upper; got lower={lower!r}, upper={upper!r}")
        constraints = [wt >= lower, wt <= upper]
    else:
        raise WorkbenchError(f"constraint={constraint!r} must be 'l1' or 'box'")
    problem = cp.Problem(cp.Minimize(cp.sum_squares(lt @ wt - z)), constraints)
    try:
        problem.solve(solver="CLARABEL" if "CLARABEL" in cp.installed_solvers() else None)
    except cp.error.SolverError as exc:
        raise WorkbenchError(f"constrained refit: the solver failed ({exc})") from None
    if problem.status not in ("optimal", "optimal_inaccurate") or wt.value is None:
        raise WorkbenchError(f"constrained refit: the solver stopped with status {problem.status!r}")
    return torch.from_numpy(np.ascontiguousarray(wt.value.T)).to(device=x.device, dtype=x.dtype)


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``round((1 - sparsity) * numel)`` largest ``|w|`` (ties: lowest index)."""
    _check_sparsity(sparsity)
    keep = int(round((1 - sparsity) * w.numel()))
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if keep:
        mask[torch.argsort(w.detach().abs().flatten(), descending=True, stable=True)[:keep]] = True
    return mask.reshape(w.shape)


def refit_on_support(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Least squares of each output row on its kept inputs: ``w: (m, n)``, zero where ``~mask``."""
    xs, ys = _as_numpy(x), _as_numpy(y)
    w = np.zeros(tuple(mask.shape))
    for row in range(mask.shape[0]):
        kept = mask[row].cpu().numpy()
        if kept.any():
            w[row, kept] = np.linalg.lstsq(xs[:, kept], ys[:, row], rcond=None)[0]
    return torch.from_numpy(w).to(device=x.device, dtype=x.dtype)


def constrained_prune(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, sparsity: float, *,
                      constraint: str = "l1", radius_fraction: float | None = None,
                      refit: bool = True) -> torch.Tensor:
    """Sparse ``w: (m, n)`` at ``sparsity``: convex refit, threshold, then least squares on the support.

    ``radius_fraction``: the L1 radius as a fraction of ``sum |w|`` (default ``1 - sparsity``);
    for "box" the bound is the ``1 - sparsity`` quantile of ``|w|``.
    """
    _check_sparsity(sparsity)
    if constraint == "l1":
        fraction = (1 - sparsity) if radius_fraction is None else radius_fraction
        solved = constrained_refit(x, y, "l1", radius=fraction * float(w.abs().sum()))
    else:
        bound = float(torch.quantile(w.detach().abs().flatten().double(), 1 - sparsity)) or 1e-3
        solved = constrained_refit(x, y, "box", lower=-bound, upper=bound)
    mask = magnitude_mask(solved, sparsity)
    return refit_on_support(x, y, mask) if refit else solved * mask


def relative_output_error(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    """``||x w^T - y||_F^2 / ||y||_F^2`` (0: outputs reproduced exactly)."""
    xs, ys = _as_numpy(x), _as_numpy(y)
    return float(((xs @ _as_numpy(w).T - ys) ** 2).sum() / max((ys ** 2).sum(), 1e-300))
