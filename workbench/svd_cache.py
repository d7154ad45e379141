"""The one cache of decompositions of weight matrices: keyed by content, LRU, bounded in bytes.

Keyed by the tensors' shapes, dtypes and a BLAKE2 digest of their bytes (plus the settings), so a
deep copy of a model (what `workbench.apply` works on) finds the SVD computed for the original,
and a changed weight or other calibration data misses. Spectra, the ``svd`` method and the
engine's factor cache go through `cached_svd`; activation-aware SVD caches its rank-independent
basis through `cached` (every rank is then a slice).
"""
from __future__ import annotations

import hashlib
import weakref
from typing import Any, Callable

import torch

from workbench.byte_lru import ByteLRU
from workbench.kernels import aware as aware_kernels
from workbench.kernels import svd as svd_kernels

DEFAULT_MAX_BYTES = 512 * 2**20

_cache = ByteLRU(DEFAULT_MAX_BYTES)
_counts = {"hits": 0, "misses": 0}


# id(tensor) -> (weakref to it, its _version, digest): the same unchanged tensor is hashed once.
# Parameters are always hashed: ``weight.data.copy_(...)`` changes one without bumping _version.
_digests: dict[int, tuple[weakref.ref, int, tuple]] = {}


def _forget(ref: weakref.ref, key: int) -> None:
    if _digests.get(key, (None,))[0] is ref:
        del _digests[key]


def _digest(tensor: torch.Tensor) -> tuple:
    key, remember = id(tensor), not isinstance(tensor, torch.nn.Parameter)
    hit = _digests.get(key) if remember else None
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest = tuple(tensor.shape), str(tensor.dtype), hashlib.blake2b(data, digest_size=16).hexdigest()
    if not remember:
        return digest
    ref = weakref.ref(tensor, lambda r, k=key: _forget(r, k))
    _digests[key] = (ref, tensor._version, digest)
    return digest


def _nbytes(result: Any) -> int:
    size = getattr(result, "nbytes", None)
    if isinstance(size, int):
        return size
    return sum(t.numel() * t.element_size() for t in (result.u, result.s, result.vh))


def cached(kind: str, tensors: tuple[torch.Tensor, ...], settings: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()``, once per distinct ``(kind, content of tensors, settings)``.

    The result must have ``u, s, vh`` tensors or an ``nbytes`` int (its size in the bound).
    """
    key = (kind, tuple(_digest(t) for t in tensors), settings)
    hit = _cache.get(key)
    if hit is not None:
        _counts["hits"] += 1
        return hit
    _counts["misses"] += 1
    result = compute()
    _cache.put(key, result, _nbytes(result))
    return result


def cached_svd(matrix: torch.Tensor) -> svd_kernels.SVD:
    """`workbench.kernels.svd.svd` of ``matrix: (m, n)``, computed once per distinct content."""
    return cached("svd", (matrix,), (), lambda: svd_kernels.svd(matrix.detach()))


def cached_gram(x: torch.Tensor) -> torch.Tensor:
    """`workbench.kernels.aware.gram` of ``x: (tokens, in)``: ``(in, in)`` float64, computed once per
    distinct content (a layer's menu builds many options on the same inputs). Do not modify it."""
    return cached("gram", (x,), (), lambda: aware_kernels.gram(x))


def set_max_bytes(max_bytes: int) -> None:
    """Bound the cache at ``max_bytes`` (evicting least recently used SVDs now if needed)."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes} must be >= 0")
    _cache.resize(max_bytes)


def clear() -> None:
    """Drop every cached SVD (the counters stay)."""
    _cache.clear()


def stats() -> dict:
    """``{"entries", "bytes", "max_bytes", "hits", "misses", "evictions"}``."""
    return {"entries": len(_cache), "max_bytes": _cache.max_bytes, "bytes": _cache.bytes_used,
            "evictions": _cache.evictions, **_counts}
