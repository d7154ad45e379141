"""Low rank and quantization together: quantized factors, and low rank plus a quantized residual.

Shapes: ``w: (m, n)`` = (out, in); rank-``r`` factors ``a: (m, r)``, ``b: (r, n)`` split as
`workbench.kernels.svd.SVD.factors` splits them (``U_r S_r^(1/2)``, ``S_r^(1/2) V_r^T``).

Codes are symmetric uniform, round to nearest (`workbench.kernels.quant.quantize_uniform`):
``x_hat = scale * (code - 2^(b-1))``. The zero point is fixed by ``bits``, so it is not stored.
There is no clipping and 0 is on the grid, so for every entry ``|x - x_hat| <= scale / 2`` and
``|x - x_hat| <= |x|``.

* ``svd_quant``: ``a`` and ``b`` each stored as packed ``b``-bit codes, with one float32 scale per
  row (a row of ``a`` is an output channel; a row of ``b`` is a rank component), or one scale per
  factor. Bytes: ``ceil(m r b / 8) + ceil(r n b / 8) + 4 (m + r)`` (per row) or ``... + 8``.
* ``svd_residual``: ``w ~ a b + Q(w - a b)``, with ``a``, ``b`` in float32 and the residual as packed
  ``b``-bit codes with one float32 scale per output row. Bytes: ``4 r (m + n) + ceil(m n b / 8) + 4 m``.

Bias is not counted here: a layer with a bias stores ``4 m`` bytes more, as the dense layer does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.kernels import quant as quant_kernels
from workbench.kernels import svd as svd_kernels

BITS = (2, 3, 4, 5, 6, 7, 8)
#: Alternating refinement steps of `residual_fit` (refit the factors, then re-quantize the residual).
REFINE_STEPS = 2
SCALE_BYTES = 4  # float32 scales


def check_bits(bits: int, name: str = "", method: str = "") -> int:
    """Raise `WorkbenchError` unless ``bits`` is an integer from 2 to 8."""
    where = f" for layer {name!r}" if name else ""
    who = f"{method} " if method else ""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise WorkbenchError(f"bits={bits!r}{where} is not allowed: {who}stores symmetric codes of "
                             f"{BITS[0]} to {BITS[-1]} bits (allowed: {', '.join(map(str, BITS))})")
    return bits


def quantize_rows(x: torch.Tensor, bits: int, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest codes of ``x: (rows, cols)``.

    Returns ``(codes, scale)``: ``codes`` uint8 ``(rows, cols)`` in ``[1, 2^bits - 1]``; ``scale``
    float32 ``(rows,)`` per row, or ``()`` for the whole tensor.
    """
    codes, scale, _ = quant_kernels.quantize_uniform(x, bits, per_channel=per_channel)
    return codes, scale.reshape(-1) if per_channel else scale.reshape(())


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 ``scale * (codes - 2^(bits-1))``, ``(rows, cols)``; ``scale``: ``(rows,)`` or ``()``."""
    step = scale.reshape(-1, 1) if scale.dim() else scale
    return step * (codes.float() - float(2 ** (bits - 1)))


def svd_quant_bytes(shape: tuple[int, int], rank: int, bits: int, per_channel: bool = True) -> int:
    """Bytes of ``svd_quant``'s codes and scales for a ``(m, n)`` weight (bias excluded)."""
    m, n = shape
    scales = (m + rank) if per_channel else 2
    return quant_kernels.packed_size(m * rank, bits) + quant_kernels.packed_size(rank * n, bits) + SCALE_BYTES * scales


def svd_residual_bytes(shape: tuple[int, int], rank: int, bits: int) -> int:
    """Bytes of ``svd_residual``'s float32 factors, residual codes and scales (bias excluded)."""
    m, n = shape
    return 4 * rank * (m + n) + quant_kernels.packed_size(m * n, bits) + SCALE_BYTES * m


def dense_bytes(shape: tuple[int, int]) -> int:
    """Bytes of the float32 ``(m, n)`` weight: ``4 m n``."""
    return 4 * shape[0] * shape[1]


def largest_rank(shape: tuple[int, int], within: int, size) -> int:
    """Largest rank ``r`` in ``1..min(m, n)`` with ``size(r) <= within`` bytes (0 if none); ``size``
    grows with ``r``."""
    lo, hi = 0, min(shape)
    while lo < hi:  # bisection: size is increasing in the rank
        mid = (lo + hi + 1) // 2
        if size(mid) <= within:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class ResidualFit:
    """``w ~ a @ b + dequantize_rows(codes, scale, bits)``; ``error``: ``||w - w_hat||_F``."""

    a: torch.Tensor       # (m, r) float32
    b: torch.Tensor       # (r, n) float32
    codes: torch.Tensor   # (m, n) uint8
    scale: torch.Tensor   # (m,) float32
    error: float


def residual_fit(w: torch.Tensor, rank: int, bits: int, factors: tuple[torch.Tensor, torch.Tensor] | None = None,
                 steps: int = REFINE_STEPS) -> ResidualFit:
    """Fit ``w: (m, n) ~ a b + Q(w - a b)`` (rank ``rank``, residual codes of ``bits`` bits per row).

    Two alternating chains, every state a candidate, the one with the smallest ``||w - w_hat||_F``
    kept:

    1. ``a b`` = the truncated SVD of ``w`` (or ``factors``), ``Q = Q(w - a b)``; its error is at most
       the plain truncation's, since ``|x - Q(x)| <= |x|`` entrywise.
    2. ``Q = Q(w)``, ``a b`` = the truncated SVD of ``w - Q(w)``; by Eckart–Young its error is at
       most the plain ``bits``-bit quantization's (per channel, symmetric).

    Then ``steps`` times each: refit ``a b`` on ``w - Q`` (never worse), re-quantize ``w - a b``.
    So the result is never worse than either plain method at the same rank and bits.
    """
    w = w.detach().float()

    def quantized(x: torch.Tensor):
        codes, scale = quantize_rows(x, bits)
        return codes, scale, dequantize_rows(codes, scale, bits)

    best: ResidualFit | None = None

    def consider(a, b, codes, scale, approx):
        nonlocal best
        error = float((w - a @ b - approx).double().norm())
        if best is None or error < best.error:
            best = ResidualFit(a.contiguous(), b.contiguous(), codes, scale, error)

    a, b = factors if factors is not None else svd_kernels.truncate(w, rank)
    a, b = a.float(), b.float()
    codes, scale, approx = quantized(w - a @ b)
    chains = [((a, b, codes, scale, approx), "refit")]  # chain 1 starts from the SVD, its codes fitted
    codes, scale, approx = quantized(w)
    chains.append(((*svd_kernels.truncate(w - approx, rank), codes, scale, approx), "quantize"))
    for (a, b, codes, scale, approx), move in chains:
        consider(a, b, codes, scale, approx)
        for _ in range(2 * steps):
            if move == "refit":
                a, b = svd_kernels.truncate(w - approx, rank)
            else:
                codes, scale, approx = quantized(w - a @ b)
            consider(a, b, codes, scale, approx)
            move = "quantize" if move == "refit" else "refit"
    return best
