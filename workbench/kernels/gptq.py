"""Error-compensating post-training quantization (GPTQ, Frantar et al. 2023) on plain tensors.

A layer ``y = x W^T`` with calibration inputs ``X: (tokens, in)`` and Gram ``H = X^T X: (in, in)``
has output error ``||X (W - Q)^T||_F^2 = sum_rows (w - q)^T H (w - q)``. Round-to-nearest (RTN)
rounds every weight alone; GPTQ quantizes the columns left to right and, after each one, moves
its rounding error onto the columns not yet quantized along ``H^{-1}`` (the optimal update of
Optimal Brain Surgeon), so correlated inputs absorb each other's errors:

    e_i = (w_i - q_i) / U_ii,   w_{i+1:} -= e_i U_{i, i+1:},   U = upper Cholesky factor of H^{-1},

where ``H`` is dampened first (``H + damp * mean(diag H) * I``). Updates are applied lazily by
blocks of ``block_size`` columns (same result, fewer passes over ``W``). Computation in float64.

Grid: uniform, ``w_hat = scale * (code - zero_point)``, the rule of `workbench.kernels.quant`
(asymmetric: the range ``[min(w, 0), max(w, 0)]`` in ``2^b - 1`` steps, integer zero point;
symmetric: ``scale = max|w| / (2^(b-1) - 1)``, ``zero_point = 2^(b-1)``). Per output row
(``group_size=None``) the grid comes from the original row, as RTN's; per group of
``group_size`` input columns it comes from the group's weights *as updated* when the group starts
(reference GPTQ). Scales are rounded to float16 (the layer stores them so) before any code is
chosen, so the codes are optimal for the grid actually stored.

Dead inputs (``H_jj = 0``: a feature that is zero on every calibration input) get ``H_jj = 1``
and no coupling: their weights are rounded to nearest and spread no error (the reference zeroes
them instead; we keep them for inputs that are not dead outside the calibration set).

Activation-aware scaling (AWQ, Lin et al. 2024), optional: columns of salient inputs are scaled
up before quantizing, ``W' = W diag(s)`` with ``s_j = rms(x_j)^alpha`` (normalised, float16), and
divided back after (``W_hat = Q(W') diag(1/s)``, the layer stores ``s``). `awq_quantize` runs
GPTQ on ``W'`` with the Gram ``diag(1/s) H diag(1/s)`` for each ``alpha`` of a grid that holds 0
(no scaling) and keeps the least calibration error: never worse than plain GPTQ on those inputs.

Why not a library: torchao's GPTQ (``torchao.prototype.gptq``) asserts a CUDA device and emits
int4/int8/nvfp4 tensor subclasses for its GPU kernels; we need 2..8 bits on CPU, stored as our
packed codes (`workbench.kernels.quant.pack_codes`).
"""
from __future__ import annotations

import torch

from workbench.errors import WorkbenchError

GPTQ_BITS = range(2, 9)
DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128
#: float16 limits the stored scales are kept within (smallest normal, largest finite)
SCALE_MIN, SCALE_MAX = 2.0 ** -14, 65504.0


def check_gptq_bits(bits, name: str = "") -> int:
    """``bits`` if an integer from 2 to 8, else `WorkbenchError` naming the value and the rule."""
    where = f" for layer {name!r}" if name else ""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in GPTQ_BITS:
        raise WorkbenchError(f"gptq bits={bits!r}{where} must be an integer from 2 to 8")
    return bits


def group_sizes(width: int) -> list[int]:
    """The group sizes a layer of ``width`` inputs can take: the divisors of ``width``."""
    return [g for g in range(1, width + 1) if width % g == 0]


def check_group_size(group_size, width: int, name: str = "") -> int:
    """``group_size`` (None: one group per row, i.e. ``width``) if it divides ``width``, else an error."""
    if group_size is None:
        return width
    where = f" of layer {name!r}" if name else ""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or width % group_size:
        allowed = ", ".join(map(str, group_sizes(width)))
        raise WorkbenchError(f"group_size={group_size!r} must be a positive divisor of the input width {width}"
                             f"{where}; allowed: {allowed}")
    return group_size


def grid_params(w: torch.Tensor, bits: int, asymmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` each ``(rows,)`` float64 of the uniform grid of each row of ``w: (rows, n)``.

    ``scale`` is rounded to float16 (kept within its normal range); ``zero_point`` is an integer.
    """
    w = w.double()
    levels = 2 ** bits - 1
    if asymmetric:
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = ((hi - lo) / levels).clamp(SCALE_MIN, SCALE_MAX).half().double()
        zero = torch.clamp(torch.round(-lo / scale), 0, levels)
    else:
        top = w.abs().amax(dim=1)
        scale = (top / (2 ** (bits - 1) - 1)).clamp(SCALE_MIN, SCALE_MAX).half().double()
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    return scale, zero


def round_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                asymmetric: bool = True) -> torch.Tensor:
    """Nearest codes (float64, integer values) of ``w: (rows, n)`` on the grids ``scale, zero: (rows,)``."""
    lo = 0 if asymmetric else 1  # symmetric: the restricted range [-(2^(b-1) - 1), 2^(b-1) - 1]
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], lo, 2 ** bits - 1)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
                 asymmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the same grids as `gptq_quantize` with an identity Gram: same outputs."""
    out, width = weight.shape
    check_gptq_bits(bits)
    g = check_group_size(group_size, width)
    blocks = weight.detach().double().reshape(out * (width // g), g)
    scale, zero = grid_params(blocks, bits, asymmetric)
    codes = round_codes(blocks, scale, zero, bits, asymmetric)
    return (codes.reshape(out, width).to(torch.uint8), scale.reshape(out, -1).float(),
            zero.reshape(out, -1).float())


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(out, in)`` float32 weights from codes ``(out, in)`` and per-group ``scale, zero_point: (out, groups)``."""
    out, width = codes.shape
    group = width // scale.shape[1]
    scale = scale.float().repeat_interleave(group, dim=1)
    zero = zero_point.float().repeat_interleave(group, dim=1)
    return scale * (codes.float() - zero)


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^{-1}`` (float64), dead inputs decoupled."""
    h = h.double().clone()
    dead = h.diagonal() <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    lam = damp * float(h.diagonal().mean())
    eye = torch.eye(len(h), dtype=torch.float64)
    for _ in range(6):  # raise the dampening tenfold while numerically indefinite
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            break
        lam = max(lam * 10, 1e-12)
    else:
        raise WorkbenchError("the calibration Gram matrix is not positive definite even after dampening")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def gptq_quantize(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None = None,
                  asymmetric: bool = True, damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK,
                  name: str = "", act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes of ``weight: (out, in)`` for inputs with Gram ``gram: (in, in)`` (``X^T X``).

    Returns ``(codes, scale, zero_point)``: ``codes`` uint8 ``(out, in)`` in ``[0, 2^bits)``;
    ``scale`` (values exact in float16) and ``zero_point`` (integers) float32 ``(out, groups)``,
    ``groups = in // group_size`` (1 when ``group_size`` is None). Dequantize with
    `dequantize_groups`. ``damp``: relative dampening of the Gram's diagonal (> 0).
    ``act_order``: quantize the columns in descending order of ``diag(H)`` (the inputs with the
    most energy first, while the most columns are left to absorb their error); the groups stay the
    contiguous column ranges of the stored layout, their grids fixed up front from the original
    weights ("static groups"), so the codes are stored exactly as without it.
    """
    if weight.dim() != 2:
        raise WorkbenchError(f"weight must be a matrix (out, in); got shape {tuple(weight.shape)}")
    out, width = weight.shape
    where = f" for layer {name!r}" if name else ""
    if gram.shape != (width, width):
        raise WorkbenchError(f"the Gram matrix is {tuple(gram.shape)} but the weight{where} has in_features={width}")
    check_gptq_bits(bits, name)
    g = check_group_size(group_size, width, name)
    if not damp > 0:
        raise WorkbenchError(f"damp={damp!r}{where} must be > 0 (relative dampening of the Gram diagonal)")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise WorkbenchError(f"block_size={block_size!r} must be a positive integer")
    w = weight.detach().double().clone()
    codes = torch.empty(out, width, dtype=torch.float64)
    scales = torch.empty(out, width // g, dtype=torch.float64)
    zeros = torch.empty_like(scales)
    if group_size is None:
        scales[:, 0], zeros[:, 0] = grid_params(w, bits, asymmetric)
    order = torch.arange(width)
    if act_order:
        order = torch.argsort(gram.double().diagonal(), descending=True, stable=True)
        for k in range(width // g):  # static groups: each grid from the original weights
            scales[:, k], zeros[:, k] = grid_params(w[:, k * g:(k + 1) * g], bits, asymmetric)
        w, gram = w[:, order], gram[order][:, order]
    group_of = order // g  # the stored group of each (permuted) column
    u = _inverse_factor(gram, damp)
    for start in range(0, width, block_size):
        stop = min(start + block_size, width)
        block = w[:, start:stop].clone()
        errors = torch.empty(out, stop - start, dtype=torch.float64)
        u_block = u[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if group_size is not None and not act_order and col % g == 0:  # the grid from the updated weights
                current = torch.cat([block[:, i:], w[:, stop:]], dim=1)[:, :g]
                scales[:, col // g], zeros[:, col // g] = grid_params(current, bits, asymmetric)
            scale, zero = scales[:, group_of[col]], zeros[:, group_of[col]]
            code = round_codes(block[:, i:i + 1], scale, zero, bits, asymmetric)[:, 0]
            codes[:, col] = code
            err = (block[:, i] - scale * (code - zero)) / u_block[i, i]
            block[:, i:] -= err[:, None] * u_block[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    if act_order:
        codes[:, order] = codes.clone()  # back to the stored column order
    return codes.to(torch.uint8), scales.float(), zeros.float()


AWQ_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def awq_candidates(gram: torch.Tensor, alphas=AWQ_ALPHAS) -> list[torch.Tensor]:
    """Input scales ``s: (in,)`` float64 (float16 values) for each ``alpha``: ``rms(x_j)^alpha``
    normalised by the geometric mean of its extremes over live inputs (dead inputs: 1)."""
    diag = gram.double().diagonal()
    live = diag > 0
    out = []
    for alpha in alphas:
        s = torch.ones_like(diag)
        if alpha and bool(live.any()):
            s[live] = diag[live].sqrt() ** alpha
            s[live] = s[live] / (s[live].max() * s[live].min()).sqrt()
        out.append(s.clamp(SCALE_MIN, SCALE_MAX).half().double())
    return out


def awq_quantize(weight: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int | None = None,
                 asymmetric: bool = True, damp: float = DEFAULT_DAMP, block_size: int = DEFAULT_BLOCK,
                 name: str = "", alphas=AWQ_ALPHAS,
                 act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight * s`` for the best ``s`` of `awq_candidates` (least calibration error).

    Returns ``(codes, scale, zero_point, input_scale)``: as `gptq_quantize`, plus ``input_scale``
    float32 ``(in,)`` (float16 values); ``W_hat = dequantize_groups(codes, scale, zero_point) / input_scale``.
    """
    w, h = weight.detach().double(), gram.double()
    best = None
    for s in awq_candidates(h, alphas):
        result = gptq_quantize(w * s, h / s[:, None] / s[None, :], bits, group_size, asymmetric, damp,
                               block_size, name, act_order)
        error = calibration_error(w, dequantize_groups(*result).double() / s, h)
        if best is None or error < best[0]:
            best = (error, *result, s.float())
    return best[1:]


def calibration_error(weight: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (W - W_hat)^T||_F^2 = trace((W - W_hat) H (W - W_hat)^T)`` from the Gram ``H = X^T X``."""
    d = weight.detach().double() - w_hat.detach().double()
    return float(((d @ gram.double()) * d).sum())
