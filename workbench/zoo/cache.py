"""On-disk cache of trained weights, keyed by a hash of the training recipe (and of the data).

Weights are stored as safetensors (loading never executes code). A file that cannot be read
or does not fit the model is treated as absent: the caller retrains and overwrites it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def cache_dir() -> Path:
    """``$WORKBENCH_CACHE``, else ``$XDG_CACHE_HOME/compression-workbench``, else ``~/.cache/...``."""
    if os.environ.get("WORKBENCH_CACHE"):
        return Path(os.environ["WORKBENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compression-workbench"


def recipe_key(recipe: dict) -> str:
    """First 16 hex digits of the SHA-256 of ``recipe`` (JSON, sorted keys) and the torch version."""
    payload = json.dumps({"recipe": recipe, "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_digest(*tensors: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of ``tensors`` (dtype, shape and bytes of each, in order):
    part of a cache key, so that weights trained on other data are never reused."""
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_weights_path(name: str, recipe: dict) -> Path:
    return cache_dir() / f"{name}-{recipe_key(recipe)}.safetensors"


def try_load(model: nn.Module, path: Path) -> bool:
    """Load ``path`` into ``model``; False (model untouched) if missing, corrupt or mismatched."""
    try:
        state = load_file(str(path))
        expected = model.state_dict()
        if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
            return False
        model.load_state_dict(state)
        return True
    except Exception:  # noqa: BLE001 - any unreadable cache file means "retrain"
        return False


def store(model: nn.Module, path: Path) -> None:
    """Write ``model``'s weights atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
