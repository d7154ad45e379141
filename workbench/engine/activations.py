"""The engine's LRU of stage inputs, bounded in bytes."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from workbench.byte_lru import ByteLRU
from workbench.errors import WorkbenchError


class ActivationCache(ByteLRU):
    """LRU of stage inputs keyed by ``(stage index, prefix signature)``, bounded in bytes."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise WorkbenchError(f"max_cache_bytes={max_bytes} must be >= 0")
        super().__init__(max_bytes)

    @staticmethod
    def size_of(value: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))

    def put(self, key: tuple, value: Any) -> None:
        super().put(key, value, self.size_of(value))
