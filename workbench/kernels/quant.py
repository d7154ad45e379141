"""Quantization kernels: uniform b-bit grids, k-means codebooks, and bit-packing of codes.

Shapes: ``w: (out, ...)`` a weight (Linear ``(out, in)``, Conv2d ``(out, in, kh, kw)``).
Codes are unsigned integers in ``[0, 2^bits)`` held in ``uint8`` tensors shaped like ``w``;
`pack_codes` stores them at ``bits`` bits each, so a 4-bit layer takes ``numel / 2`` bytes.

Uniform grids dequantize as ``w_hat = scale * (code - zero_point)``:

- symmetric, ``bits >= 2``: ``scale = max|w| / (2^(b-1) - 1)``, ``zero_point = 2^(b-1)``; codes use
  the restricted signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (zero is exact);
- symmetric, ``bits = 1``: binarization ``w_hat = ±mean|w|`` (``scale = 2 mean|w|``, ``zero_point = 1/2``);
- asymmetric: the range ``[min(w, 0), max(w, 0)]`` split into ``2^b - 1`` steps, integer zero point.

The range comes from ``clip`` (`CLIPS`): ``"max"`` takes it from the largest weights as above;
``"percentile"`` from the `CLIP_PERCENTILE` th percentile of ``|w|`` (asymmetric: of ``w`` and
its ``100 - p`` th), as ``numpy.percentile`` computes it; ``"mse"`` shrinks the max range by the
fraction of `MSE_FRACTIONS` that minimizes each group's squared rounding error
``sum (w - w_hat)^2`` (1.0, the max range, is a candidate, so its error is never larger than
``"max"``'s). Weights beyond a clipped range get the end code. Binarization (symmetric
``bits = 1``) ignores ``clip``: ``±mean|w|`` is already the least-squares scale of sign codes.
With round-to-nearest and ``clip="max"``, ``|w - w_hat| <= scale / 2`` for every weight (``bits >= 2``).
``scale`` and ``zero_point`` are scalars (per tensor) or ``(out, 1, ...)`` (per output channel).
K-means (weight clustering) replaces the grid by a sorted codebook of ``2^bits`` centroids
(scikit-learn ``KMeans``, seeded): ``w_hat = codebook[code]``.
"""
from __future__ import annotations

import difflib
import warnings

import numpy as np
import torch

from workbench.errors import WorkbenchError

#: Bit widths that mean "keep the float weights" (no quantization).
NO_OP_BITS = (16, 32)
SCHEMES = ("uniform", "kmeans")
#: How a uniform grid chooses its range (see the module docstring).
CLIPS = ("max", "mse", "percentile")
#: Percentile of ``|w|`` that ``clip="percentile"`` takes as the range.
CLIP_PERCENTILE = 99.9
#: Candidate fractions of the max range that ``clip="mse"`` tries: 1.00, 0.99, ..., 0.01.
MSE_FRACTIONS = tuple(round(1 - i / 100, 2) for i in range(100))
#: Widths up to this use ``clip="mse"`` by default (`default_clip`); wider grids use ``"max"``.
MSE_DEFAULT_MAX_BITS = 4


def check_bits(bits: int, name: str = "", allow_no_op: bool = False) -> int:
    """Raise `WorkbenchError` unless ``1 <= bits <= 8`` (or 16 / 32 when ``allow_no_op``)."""
    where = f" for layer {name!r}" if name else ""
    extra = " (or 16/32 for no quantization)" if allow_no_op else ""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise WorkbenchError(f"bits={bits!r}{where} must be an integer from 1 to 8{extra}")
    if 1 <= bits <= 8 or (allow_no_op and bits in NO_OP_BITS):
        return bits
    raise WorkbenchError(f"bits={bits}{where} is outside 1..8{extra}")


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise WorkbenchError(f"scheme={scheme!r} must be one of {', '.join(SCHEMES)}")
    return scheme


def check_clip(clip: str, name: str = "") -> str:
    """``clip`` if it is one of `CLIPS`, else a `WorkbenchError` naming the value and the choices."""
    if not isinstance(clip, str) or clip not in CLIPS:
        where = f" for layer {name!r}" if name else ""
        close = difflib.get_close_matches(clip, CLIPS, n=1) if isinstance(clip, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise WorkbenchError(f"clip={clip!r}{where} must be one of {', '.join(CLIPS)}{hint}: how a uniform grid "
                             "chooses its range (largest weight, least squared rounding error, "
                             f"{CLIP_PERCENTILE}th percentile)")
    return clip


def default_clip(bits: int) -> str:
    """The clip a uniform grid of ``bits`` bits uses when none is given: ``"mse"`` up to
    `MSE_DEFAULT_MAX_BITS` bits (from the largest weight a 2-bit grid leaves most weights in
    its zero bin), ``"max"`` above (a fine grid loses little to one outlier)."""
    return "mse" if bits <= MSE_DEFAULT_MAX_BITS else "max"


def _rows(w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``(groups, n)``: one row per output channel, or the whole tensor as one row."""
    w = w.detach()
    return w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)


def _shape_param(p: torch.Tensor, w: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """``(groups, 1)`` -> ``(out, 1, ...)`` broadcastable to ``w``, or a scalar."""
    return p.reshape(w.shape[0], *([1] * (w.dim() - 1))) if per_channel else p.reshape(())


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``numpy.percentile(values, q, axis=1)`` (linear interpolation) of ``values: (groups, n)``, ``(groups, 1)``."""
    found = np.percentile(values.detach().cpu().double().numpy(), q, axis=1, keepdims=True)
    return torch.from_numpy(found).to(device=values.device, dtype=values.dtype)


def _range(rows: torch.Tensor, clip: str, asymmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` per group ``(groups, 1)`` before any MSE shrinking; ``lo = -hi`` when symmetric."""
    if asymmetric:
        if clip == "percentile":
            lo, hi = _percentile(rows, 100 - CLIP_PERCENTILE), _percentile(rows, CLIP_PERCENTILE)
        else:
            lo, hi = rows.amin(dim=1, keepdim=True), rows.amax(dim=1, keepdim=True)
        return lo.clamp(max=0), hi.clamp(min=0)
    top = _percentile(rows.abs(), CLIP_PERCENTILE) if clip == "percentile" else rows.abs().amax(dim=1, keepdim=True)
    return -top, top


def _grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, asymmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` per group of the grid spanning ``[lo, hi]`` (``bits >= 2`` or asymmetric)."""
    if asymmetric:
        levels = 2 ** bits - 1
        scale = (hi - lo) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.clamp(torch.round(-lo / scale), 0, levels)
    qmax = 2 ** (bits - 1) - 1
    scale = torch.where(hi > 0, hi / qmax, torch.ones_like(hi))
    return scale, torch.full_like(scale, float(2 ** (bits - 1)))


def _codes(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, asymmetric: bool) -> torch.Tensor:
    """Round-to-nearest codes (float) of ``rows`` on the grid, clamped to the code range."""
    if asymmetric:
        return torch.clamp(torch.round(rows / scale) + zero, 0, 2 ** bits - 1)
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(rows / scale), -qmax, qmax) + zero


def _mse_fraction(rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                  asymmetric: bool) -> torch.Tensor:
    """Per group ``(groups, 1)``, the fraction of `MSE_FRACTIONS` whose shrunk range ``[f lo, f hi]``
    gives the least ``sum (w - w_hat)^2``; ties keep the wider range (1.0 is tried first)."""
    best = torch.ones_like(hi)
    best_err = torch.full_like(hi, float("inf"))
    for fraction in MSE_FRACTIONS:
        scale, zero = _grid(lo * fraction, hi * fraction, bits, asymmetric)
        w_hat = scale * (_codes(rows, scale, zero, bits, asymmetric) - zero)
        err = ((rows - w_hat) ** 2).sum(dim=1, keepdim=True)
        better = err < best_err
        best = torch.where(better, torch.full_like(best, fraction), best)
        best_err = torch.where(better, err, best_err)
    return best


def quantize_uniform(w: torch.Tensor, bits: int, per_channel: bool = False,
                     asymmetric: bool = False, clip: str = "max") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest uniform quantization of ``w`` to ``bits`` bits, range chosen by ``clip``.

    ``clip``: "max" (the largest weights), "mse" (least squared rounding error per group: per
    output channel when ``per_channel``, else the whole tensor) or "percentile"; see the module
    docstring. Returns ``(codes, scale, zero_point)``: ``codes`` uint8 shaped like ``w`` in
    ``[0, 2^bits)``; ``scale`` and ``zero_point`` float32, scalars or ``(out, 1, ...)`` when ``per_channel``.
    """
    check_bits(bits)
    check_clip(clip)
    rows = _rows(w, per_channel).float()
    if bits == 1 and not asymmetric:  # binarization: mean|w| is the least-squares scale, whatever clip says
        mean_abs = rows.abs().mean(dim=1, keepdim=True)
        scale = torch.where(mean_abs > 0, 2 * mean_abs, torch.ones_like(mean_abs))
        zero = torch.full_like(scale, 0.5)
        codes = (rows >= 0).float()
    else:
        lo, hi = _range(rows, clip, asymmetric)
        if clip == "mse":
            fraction = _mse_fraction(rows, lo, hi, bits, asymmetric)
            lo, hi = lo * fraction, hi * fraction
        scale, zero = _grid(lo, hi, bits, asymmetric)
        codes = _codes(rows, scale, zero, bits, asymmetric)
    return (codes.to(torch.uint8).reshape(w.shape), _shape_param(scale, w, per_channel),
            _shape_param(zero, w, per_channel))


def dequantize_uniform(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - zero_point)`` as float32, shaped like ``codes``."""
    return scale * (codes.float() - zero_point)


def uniform_grid(scale: float, zero_point: float, bits: int) -> torch.Tensor:
    """The ``2^bits`` representable values of one uniform grid, ascending."""
    return scale * (torch.arange(2 ** bits, dtype=torch.float32) - zero_point)


KMEANS_FIT_SAMPLES = 65_536  # values a group's k-means is fitted on (larger groups: a seeded sample)
KMEANS_REFINE = 3            # Lloyd steps on all the group's values after fitting on the sample


def kmeans_codebook(w: torch.Tensor, bits: int, per_channel: bool = False,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight clustering: scikit-learn ``KMeans(2^bits, random_state=seed)`` on the weight values.

    Returns ``(codes, codebook)``: ``codes`` uint8 shaped like ``w`` (index of the nearest
    centroid); ``codebook`` float32 ``(2^bits,)`` ascending, or ``(out, 2^bits)`` per channel.
    A group with fewer distinct values than ``2^bits`` gets its distinct values, the rest of
    the codebook repeating the largest one. A group of more than `KMEANS_FIT_SAMPLES` values
    (MiniLM's FFN: 590k) is fitted on a seeded sample of that many, then refined by
    `KMEANS_REFINE` exact 1-D Lloyd steps on all its values.
    """
    from sklearn.cluster import KMeans  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    check_bits(bits)
    k = 2 ** bits
    rows = _rows(w, per_channel).detach().double().cpu().numpy()  # scikit-learn runs on the CPU
    codes = np.empty(rows.shape, dtype=np.uint8)
    books = np.empty((rows.shape[0], k), dtype=np.float64)
    for i, row in enumerate(rows):
        distinct = np.unique(row)
        if len(distinct) <= k:
            centroids = distinct
            labels = np.searchsorted(distinct, row)
        else:
            sample = row
            if len(row) > KMEANS_FIT_SAMPLES:  # fit on a seeded sample, then refine on all values
                sample = np.random.default_rng(seed).choice(row, KMEANS_FIT_SAMPLES, replace=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(sample.reshape(-1, 1))
            centroids = np.sort(km.cluster_centers_[:, 0])
            refinements = KMEANS_REFINE if sample is not row else 0
            for _ in range(refinements + 1):  # 1-D Lloyd steps: nearest centroid = between midpoints
                labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, row)
                if _ == refinements:
                    break
                counts = np.bincount(labels, minlength=k)
                sums = np.bincount(labels, weights=row, minlength=k)
                centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        books[i, :len(centroids)] = centroids
        books[i, len(centroids):] = centroids[-1]
        codes[i] = labels
    codebook = torch.from_numpy(books).float().to(w.device)
    return (torch.from_numpy(codes).reshape(w.shape).to(w.device),
            codebook if per_channel else codebook.reshape(k))


def dequantize_codebook(codes: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[codes]`` (per channel: ``codebook[row, codes[row]]``), float, shaped like ``codes``."""
    idx = codes.long()
    if codebook.dim() == 1:
        return codebook[idx]
    flat = idx.reshape(idx.shape[0], -1)
    return torch.gather(codebook, 1, flat).reshape(codes.shape)


def packed_size(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (count * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (any shape, values ``< 2^bits``) into a flat uint8 stream.

    Little-endian bit order: code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the stream.
    Returns ``(packed_size(codes.numel(), bits),)`` uint8.
    """
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2 ** bits):
        raise WorkbenchError(f"codes must lie in [0, {2 ** bits - 1}] to pack at bits={bits}; "
                             f"got [{int(flat.min())}, {int(flat.max())}]")
    if bits == 8:
        return flat.to(torch.uint8)
    if bits == 1:  # bitmaps: numpy's packbits is a single C loop
        return torch.from_numpy(np.packbits(flat.to(torch.uint8).cpu().numpy(), bitorder="little")).to(flat.device)
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte
        per = 8 // bits
        flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % per)]).reshape(-1, per)
        return (flat << (bits * torch.arange(per, device=flat.device))).sum(dim=1).to(torch.uint8)
    stream = ((flat[:, None] >> torch.arange(bits, device=flat.device)) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, device=flat.device)).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first ``count`` codes, ``(count,)`` uint8."""
    check_bits(bits)
    if packed.numel() != packed_size(count, bits):
        raise WorkbenchError(f"{packed.numel()} packed bytes cannot hold exactly {count} codes of "
                             f"{bits} bits (expected {packed_size(count, bits)})")
    if bits == 8:
        return packed.reshape(-1).clone()
    if bits == 1:
        return torch.from_numpy(np.unpackbits(packed.cpu().numpy(), count=count, bitorder="little")).to(packed.device)
    if 8 % bits == 0:
        per = 8 // bits
        codes = (packed.to(torch.int32)[:, None] >> (bits * torch.arange(per, dtype=torch.int32, device=packed.device))) & (2 ** bits - 1)
        return codes.reshape(-1)[:count].to(torch.uint8)
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)[:count * bits]
    return (stream.reshape(count, bits) << torch.arange(bits, device=packed.device)).sum(dim=1).to(torch.uint8)


def weight_mse(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Mean squared error between a weight and its quantized version."""
    return float(((w.detach().float() - w_hat.detach().float()) ** 2).mean())
