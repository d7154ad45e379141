"""The engine's LRU of stage inputs, bounded in bytes."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from workbench.errors import WorkbenchError


class ActivationCache:
    """LRU of stage inputs keyed by ``(stage index, prefix signature)``, bounded in bytes."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise WorkbenchError(f"max_cache_bytes={max_bytes} must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0

    @staticmethod
    def size_of(value: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))

    def get(self, key: tuple) -> Any | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        self._entries.move_to_end(key)
        return hit[0]

    def put(self, key: tuple, value: Any) -> None:
        size = self.size_of(value)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes_used -= self._entries.pop(key)[1]
        while self._entries and self.bytes_used + size > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.bytes_used -= old
            self.evictions += 1
        self._entries[key] = (value, size)
        self.bytes_used += size

    def __len__(self) -> int:
        return len(self._entries)
