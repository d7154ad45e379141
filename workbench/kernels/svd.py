"""Truncated SVD kernels: spectra, rank rules and factors.

Shapes: a weight matrix ``w: (m, n)`` = (out, in). A rank-``r`` factorization is
``w ≈ a @ b`` with ``a: (m, r)`` and ``b: (r, n)``; by Eckart–Young it is the best rank-r
approximation in Frobenius norm, with error ``sqrt(sum of discarded sigma^2)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class SVD:
    """Thin SVD of ``w: (m, n)``: ``u: (m, k)``, ``s: (k,)`` descending, ``vh: (k, n)``, k = min(m, n)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.vh.shape[1])

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` with ``a: (m, rank)``, ``b: (rank, n)``; sqrt(sigma) split evenly between them."""
        check_rank(rank, self.shape)
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vh[:rank]


def svd(w: torch.Tensor) -> SVD:
    """Full thin SVD, computed in float64 for accuracy and returned in ``w``'s dtype."""
    u, s, vh = torch.linalg.svd(w.detach().double(), full_matrices=False)
    return SVD(u.to(w.dtype), s.to(w.dtype), vh.to(w.dtype))


def singular_values(w: torch.Tensor) -> torch.Tensor:
    """Singular values of ``w: (m, n)``, descending, ``(min(m, n),)``."""
    return torch.linalg.svdvals(w.detach().double()).to(w.dtype)


def check_rank(rank: int, shape: tuple[int, int], name: str = "") -> None:
    """Raise `WorkbenchError` unless ``1 <= rank <= min(shape)``."""
    where = f" for layer {name!r}" if name else ""
    limit = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise WorkbenchError(f"rank={rank!r}{where} must be an integer between 1 and min(out, in)={limit}")
    if rank < 1:
        raise WorkbenchError(f"rank={rank}{where} must be at least 1 (allowed: 1..{limit})")
    if rank > limit:
        raise WorkbenchError(f"rank={rank} is above min(out, in)={limit}{where} (shape {tuple(shape)})")


def truncate(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(a, b)`` of ``w: (m, n)`` with ``a @ b ≈ w``."""
    return svd(w).factors(rank)


def energy(s: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of sigma^2 kept at each rank: ``energy[r-1] = sum(s[:r]^2) / sum(s^2)``."""
    sq = s.double() ** 2
    total = sq.sum()
    if total == 0:
        return torch.ones_like(sq)
    return (sq.cumsum(0) / total).to(s.dtype)


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p = s / sum(s)``."""
    p = s.double() / s.double().sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def truncation_error(s: torch.Tensor, rank: int) -> float:
    """Eckart–Young Frobenius error of the rank-``rank`` truncation: ``sqrt(sum(s[rank:]^2))``."""
    return float(s[rank:].double().pow(2).sum().sqrt())


def factored_params(shape: tuple[int, int], rank: int) -> int:
    """Weights of the two factors: ``rank * (m + n)`` (bias not included)."""
    return rank * (shape[0] + shape[1])


def breakeven_rank(shape: tuple[int, int]) -> int:
    """Largest rank whose factors hold fewer weights than the dense ``m * n`` matrix (0 if none)."""
    m, n = shape
    return max(0, math.ceil(m * n / (m + n)) - 1)


def check_fraction(value: float, what: str) -> float:
    """Raise `WorkbenchError` unless ``0 < value <= 1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1):
        raise WorkbenchError(f"{what}={value!r} must be in (0, 1]")
    return float(value)


def rank_for_ratio(shape: tuple[int, int], ratio: float) -> int:
    """Largest rank ``r >= 1`` with ``r * (m + n) <= ratio * m * n`` (kept-parameter ratio)."""
    check_fraction(ratio, "ratio")
    m, n = shape
    return max(1, min(min(m, n), math.floor(ratio * m * n / (m + n))))


def rank_for_energy(s: torch.Tensor, threshold: float) -> int:
    """Smallest rank keeping at least ``threshold`` of the sigma^2 energy."""
    check_fraction(threshold, "energy")
    cumulative = energy(s).double()
    hits = (cumulative >= threshold - 1e-12).nonzero()
    return int(hits[0]) + 1 if len(hits) else len(s)
