"""`ByteLRU`: a least-recently-used map bounded by the bytes of what it holds.

The engine's stage inputs (`workbench.engine.activations`) and the decomposition cache
(`workbench.svd_cache`) both keep one; each entry is stored with its size in bytes.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable


class ByteLRU:
    """``put(key, value, size)`` / ``get(key)``; ``bytes_used <= max_bytes`` always.

    Inserting past the bound evicts the least recently used entries first (``evictions`` counts
    them); a value larger than the whole bound is not kept. ``get`` refreshes an entry.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0

    def get(self, key: Hashable) -> Any | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: Hashable, value: Any, size: int) -> None:
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes_used -= self._entries.pop(key)[1]
        self._evict_until(self.max_bytes - size)
        self._entries[key] = (value, size)
        self.bytes_used += size

    def resize(self, max_bytes: int) -> None:
        """Bound the map at ``max_bytes``, evicting least recently used entries now if needed."""
        self.max_bytes = max_bytes
        self._evict_until(max_bytes)

    def clear(self) -> None:
        """Drop every entry (``evictions`` stays)."""
        self._entries.clear()
        self.bytes_used = 0

    def _evict_until(self, limit: int) -> None:
        while self._entries and self.bytes_used > limit:
            _, (_, old) = self._entries.popitem(last=False)
            self.bytes_used -= old
            self.evictions += 1

    def __len__(self) -> int:
        return len(self._entries)
