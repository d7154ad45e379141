"""Row-wise asymmetric b-bit quantization of a table ``w: (rows, dim)`` (embedding tables, LM heads).

Each row ``i`` gets its own grid ``w_hat[i, j] = scale[i] * (code[i, j] - zero[i])``:

- the row's range ``[min(w_i, 0), max(w_i, 0)]`` split into ``2^b - 1`` steps (zero is on the grid,
  so a zero row, e.g. a padding row, dequantizes to exactly zero);
- ``scale``: float16 ``(rows,)``, rounded UP from the float32 step so that the grid still covers
  the row: round-to-nearest then keeps ``|w - w_hat| <= scale / 2`` for every entry;
- ``zero``: uint8 ``(rows,)`` in ``[0, 2^b - 1]`` (integer, so 0 is exactly representable).

Codes are packed per row, byte-aligned (`pack_rows`): a row takes ``ceil(dim * b / 8)`` bytes, so
any set of rows is read without touching the others. Stored bytes of a table:
``rows * ceil(dim * b / 8) + rows * (2 + 1)`` (`table_bytes`).
"""
from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.kernels.quant import pack_codes, unpack_codes

MIN_BITS, MAX_BITS = 2, 8
SCALE_DTYPE, ZERO_DTYPE = torch.float16, torch.uint8


def check_row_bits(bits, name: str = "") -> int:
    """``bits`` if an integer in 2..8, else `WorkbenchError` naming the value and the rule."""
    where = f" for layer {name!r}" if name else ""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise WorkbenchError(f"bits={bits!r}{where} must be an integer from {MIN_BITS} to {MAX_BITS} "
                             "(row-wise embedding quantization)")
    return bits


def row_bytes(dim: int, bits: int) -> int:
    """Bytes of one packed row of ``dim`` codes: ``ceil(dim * bits / 8)``."""
    return (dim * bits + 7) // 8


def table_bytes(rows: int, dim: int, bits: int) -> int:
    """Stored bytes of a ``(rows, dim)`` table: packed codes + a float16 scale and a uint8 zero per row."""
    return rows * row_bytes(dim, bits) + rows * (2 + 1)


def _round_up_half(step: torch.Tensor) -> torch.Tensor:
    """float32 ``step`` -> the smallest float16 >= it (a grid of that step still covers the range)."""
    half = step.to(SCALE_DTYPE)
    below = half.float() < step
    if below.any():
        half = torch.where(below, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return half


def quantize_rows(w: torch.Tensor, bits: int, name: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest row-wise asymmetric quantization of ``w: (rows, dim)``.

    Returns ``(codes uint8 (rows, dim), scale float16 (rows,), zero uint8 (rows,))``.
    Raises `WorkbenchError` when a row's step exceeds float16's range.
    """
    check_row_bits(bits, name)
    if w.dim() != 2:
        raise WorkbenchError(f"row-wise quantization takes a (rows, dim) table; got shape {tuple(w.shape)}")
    rows = w.detach().float()
    levels = 2 ** bits - 1
    lo = rows.amin(dim=1).clamp(max=0) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    hi = rows.amax(dim=1).clamp(min=0) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    step = (hi - lo) / levels
    step = torch.where(step > 0, step, torch.ones_like(step))
    if not torch.isfinite(step).all() or float(step.max()) > torch.finfo(SCALE_DTYPE).max:
        raise WorkbenchError(f"layer {name!r}: a row spans more than float16 scales can step over "
                             f"(max step {float(step.max()):.3g} > {torch.finfo(SCALE_DTYPE).max})")
    scale = _round_up_half(step)
    s = scale.float()[:, None]
    zero = torch.clamp(torch.round(-lo[:, None] / s), 0, levels)
    codes = torch.clamp(torch.round(rows / s) + zero, 0, levels)
    return codes.to(torch.uint8), scale, zero[:, 0].to(ZERO_DTYPE)


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``scale[i] * (codes[i] - zero[i])`` as float32 ``(n, dim)`` for codes ``(n, dim)``."""
    return scale.float()[:, None] * (codes.float() - zero.float()[:, None])


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, dim)`` codes -> ``(rows, row_bytes(dim, bits))`` uint8, each row byte-aligned.

    Within a row, little-endian bit order as `workbench.kernels.quant.pack_codes`.
    """
    check_row_bits(bits)
    n, dim = codes.shape
    if (dim * bits) % 8 == 0:  # whole bytes a row: the flat stream is already row-aligned
        return pack_codes(codes, bits).reshape(n, dim * bits // 8)
    if codes.numel() and int(codes.max()) >= 2 ** bits:
        raise WorkbenchError(f"codes must lie in [0, {2 ** bits - 1}] to pack at bits={bits}; got {int(codes.max())}")
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.to(torch.uint8)[..., None] >> shifts) & 1).reshape(n, dim * bits)
    stream = torch.nn.functional.pad(stream, (0, row_bytes(dim, bits) * 8 - dim * bits)).reshape(n, -1, 8)
    return (stream.to(torch.int32) << torch.arange(8, dtype=torch.int32, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_rows(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of `pack_rows`: ``(n, row_bytes)`` uint8 -> ``(n, dim)`` uint8 codes."""
    n = packed.shape[0]
    if packed.shape[-1] != row_bytes(dim, bits):
        raise WorkbenchError(f"packed rows of {packed.shape[-1]} bytes cannot hold {dim} codes of {bits} bits "
                             f"(expected {row_bytes(dim, bits)})")
    if (dim * bits) % 8 == 0:
        return unpack_codes(packed.reshape(-1), bits, n * dim).reshape(n, dim)
    bits_of = ((packed.to(torch.int32)[..., None] >> torch.arange(8, dtype=torch.int32, device=packed.device)) & 1)
    stream = bits_of.reshape(n, -1)[:, :dim * bits].reshape(n, dim, bits)
    return (stream << torch.arange(bits, dtype=torch.int32, device=packed.device)).sum(-1).to(torch.uint8)
