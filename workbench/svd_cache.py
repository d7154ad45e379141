"""The one cache of thin SVDs of weight matrices: keyed by content, LRU, bounded in bytes.

Keyed by the matrix's shape, dtype and a BLAKE2 digest of its bytes, so a deep copy of a model
(what `workbench.apply` works on) finds the SVD computed for the original, and a changed weight
misses. Spectra, the ``svd`` method and the engine's factor cache all go through `cached_svd`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from workbench.kernels import svd as svd_kernels

DEFAULT_MAX_BYTES = 512 * 2**20

_entries: OrderedDict[tuple, tuple[svd_kernels.SVD, int]] = OrderedDict()
_state = {"max_bytes": DEFAULT_MAX_BYTES, "bytes": 0, "hits": 0, "misses": 0, "evictions": 0}


def _key(matrix: torch.Tensor) -> tuple:
    data = matrix.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return tuple(matrix.shape), str(matrix.dtype), hashlib.blake2b(data, digest_size=16).hexdigest()


def _nbytes(result: svd_kernels.SVD) -> int:
    return sum(t.numel() * t.element_size() for t in (result.u, result.s, result.vh))


def cached_svd(matrix: torch.Tensor) -> svd_kernels.SVD:
    """`workbench.kernels.svd.svd` of ``matrix: (m, n)``, computed once per distinct content."""
    key = _key(matrix)
    hit = _entries.get(key)
    if hit is not None:
        _entries.move_to_end(key)
        _state["hits"] += 1
        return hit[0]
    _state["misses"] += 1
    result = svd_kernels.svd(matrix.detach())
    size = _nbytes(result)
    if size <= _state["max_bytes"]:
        while _entries and _state["bytes"] + size > _state["max_bytes"]:
            _, (_, old) = _entries.popitem(last=False)
            _state["bytes"] -= old
            _state["evictions"] += 1
        _entries[key] = (result, size)
        _state["bytes"] += size
    return result


def set_max_bytes(max_bytes: int) -> None:
    """Bound the cache at ``max_bytes`` (evicting least recently used SVDs now if needed)."""
    if max_bytes < 0:
        raise ValueError(f"max_bytes={max_bytes} must be >= 0")
    _state["max_bytes"] = max_bytes
    while _entries and _state["bytes"] > max_bytes:
        _, (_, old) = _entries.popitem(last=False)
        _state["bytes"] -= old
        _state["evictions"] += 1


def clear() -> None:
    """Drop every cached SVD (the counters stay)."""
    _entries.clear()
    _state["bytes"] = 0


def stats() -> dict:
    """``{"entries", "bytes", "max_bytes", "hits", "misses", "evictions"}``."""
    return {"entries": len(_entries), **_state}
