"""N:M semi-structured sparsity kernels: in every group of ``m`` consecutive inputs of an output row,
keep the ``n`` weights of largest magnitude (2:4, 4:8; Mishra et al. 2021, arXiv:2104.08378).

A weight ``(out, in)`` with ``m | in`` has ``out * in / m`` groups. Each group is stored as its
``n`` kept values (in input order) and ONE index code: the rank of its kept positions
``c_0 < ... < c_{n-1}`` in the combinatorial number system, ``sum_i C(c_i, i + 1)``, a number in
``[0, C(m, n))``, so ``ceil(log2 C(m, n))`` bits per group (2:4: 3 bits, 4:8: 7 bits), packed
bit by bit (`workbench.kernels.quant.pack_codes`). ``m`` is at most 8 so a code fits one byte.
"""
from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError
from workbench.kernels.quant import pack_codes, packed_size, unpack_codes

MAX_M = 8


def check_nm(n: int, m: int, width: int | None = None, name: str = "") -> tuple[int, int]:
    """Raise `WorkbenchError` unless ``1 <= n < m <= MAX_M`` and ``m`` divides ``width`` (inputs)."""
    where = f" for layer {name!r}" if name else ""
    for label, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise WorkbenchError(f"{label}={value!r}{where} must be an integer (N:M keeps n of every m inputs)")
    if not 2 <= m <= MAX_M:
        raise WorkbenchError(f"m={m}{where} must be in 2..{MAX_M} (the group of consecutive inputs; "
                             f"its index code must fit one byte)")
    if not 1 <= n < m:
        raise WorkbenchError(f"n={n}{where} must satisfy 1 <= n < m={m}: n of every m weights are kept "
                             f"(n >= m would prune nothing)")
    if width is not None and width % m:
        raise WorkbenchError(f"m={m} does not divide the input width {width} of layer {name!r}: "
                             f"N:M sparsity needs groups of m consecutive inputs")
    return n, m


def code_bits(n: int, m: int) -> int:
    """Bits of one group's index code: ``ceil(log2 C(m, n))`` (2:4 -> 3, 4:8 -> 7)."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def nm_bytes(out_features: int, in_features: int, n: int, m: int, value_bytes: int = 4, bias: bool = True) -> int:
    """Payload bytes of an N:M layer: kept values, packed index codes, float32 bias."""
    groups = out_features * in_features // m
    return groups * n * value_bytes + packed_size(groups, code_bits(n, m)) + (4 * out_features if bias else 0)


def nm_mask(weight: torch.Tensor, n: int, m: int, name: str = "") -> torch.Tensor:
    """bool ``(out, in)``: the ``n`` largest ``|w|`` of every ``m`` consecutive inputs (ties: lower index)."""
    out, width = weight.shape
    check_nm(n, m, width, name)
    groups = weight.detach().abs().reshape(out, width // m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(out, width)


def _binomials(m: int, n: int, device) -> torch.Tensor:
    """``(m, n + 1)`` int64 table ``C(c, k)`` for ``c < m``, ``k <= n``."""
    return torch.tensor([[math.comb(c, k) for k in range(n + 1)] for c in range(m)], dtype=torch.int64, device=device)


def positions_of(mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``(groups, n)`` int64 kept positions in ``0..m-1``, ascending, of a mask with exactly ``n`` per group."""
    grouped = mask.reshape(-1, m)
    counts = grouped.sum(dim=1)
    if bool((counts != n).any()):
        bad = int((counts != n).nonzero()[0, 0])
        raise WorkbenchError(f"group {bad} keeps {int(counts[bad])} weights; an {n}:{m} mask keeps exactly {n} per group")
    index = torch.arange(m, device=mask.device).expand_as(grouped)
    return torch.sort(torch.where(grouped, index, m), dim=1).values[:, :n]


def rank_positions(positions: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``(groups,)`` int64 combinatorial rank ``sum_i C(c_i, i + 1)`` of ascending ``positions (groups, n)``."""
    table = _binomials(m, n, positions.device)
    return table[positions, torch.arange(1, n + 1, device=positions.device)].sum(dim=1)


def unrank_positions(codes: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of `rank_positions`: ``(groups, n)`` ascending positions from ``(groups,)`` codes.

    Greedy decoding: for ``k = n .. 1``, ``c_{k-1}`` is the largest ``c`` with ``C(c, k) <= rest``.
    """
    table = _binomials(m, n, codes.device)
    rest = codes.to(torch.int64).clone()
    out = torch.empty(codes.numel(), n, dtype=torch.int64, device=codes.device)
    for k in range(n, 0, -1):
        c = (table[:, k][None, :] <= rest[:, None]).sum(dim=1) - 1
        out[:, k - 1] = c
        rest -= table[c, k]
    return out


def encode(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (out, in * n / m), packed codes uint8)`` of ``weight (out, in)`` under an N:M ``mask``."""
    out, width = weight.shape
    positions = positions_of(mask, n, m)
    values = weight.detach().reshape(-1, m).gather(1, positions).reshape(out, width * n // m).clone()
    return values, pack_codes(rank_positions(positions, n, m), code_bits(n, m))


def kept_columns(packed: torch.Tensor, n: int, m: int, out: int, width: int) -> torch.Tensor:
    """``(out, in * n / m)`` int64 input index of each stored value, decoded from the packed codes."""
    groups = out * width // m
    positions = unrank_positions(unpack_codes(packed, code_bits(n, m), groups), n, m)
    base = (torch.arange(groups, device=packed.device) % (width // m)) * m
    return (positions + base[:, None]).reshape(out, width * n // m)


def decode(values: torch.Tensor, packed: torch.Tensor, n: int, m: int, width: int) -> torch.Tensor:
    """The dense ``(out, width)`` weight, zeros at pruned entries, from values and packed codes."""
    out = values.shape[0]
    columns = kept_columns(packed, n, m, out, width)
    return values.new_zeros(out, width).scatter_(1, columns, values)
