"""Save a compressed model as one safetensors file (weights + plan in its header) and load it back.

The file holds the compressed weights and, in the safetensors metadata, a JSON header:
``{"format_version", "model", "plan", "versions"}``. Loading rebuilds the structure by applying
the plan to the named embedded model, then loads the saved weights; nothing in the file is
executed (safetensors holds only tensors and strings).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.errors import WorkbenchError
from workbench.plan import Plan

EXPORT_FORMAT_VERSION = 1
HEADER_KEY = "workbench"


def _versions() -> dict:
    import workbench
    return {"workbench": workbench.__version__, "torch": torch.__version__}


def save_compressed(path: str | os.PathLike, model: nn.Module, plan: Plan, model_name: str) -> Path:
    """Write ``model``'s weights and ``plan`` to ``path`` atomically; returns the path written."""
    path = Path(path)
    if not path.parent.exists() or not os.access(path.parent, os.W_OK):
        raise WorkbenchError(f"cannot write {str(path)!r}: folder {str(path.parent)!r} is missing or not writable")
    header = {"format_version": EXPORT_FORMAT_VERSION, "model": model_name,
              "plan": plan.to_dict(), "versions": _versions()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={HEADER_KEY: json.dumps(header)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The workbench header of a saved file, validated."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise WorkbenchError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    if HEADER_KEY not in metadata:
        raise WorkbenchError(f"{str(path)!r} is a safetensors file but not one saved by the workbench")
    header = json.loads(metadata[HEADER_KEY])
    if header.get("format_version", 0) > EXPORT_FORMAT_VERSION:
        raise WorkbenchError(f"{str(path)!r} has format_version={header['format_version']}; "
                             f"this workbench reads up to {EXPORT_FORMAT_VERSION}")
    return header


def load_compressed(path: str | os.PathLike) -> tuple[nn.Module, Plan, str]:
    """``(model, plan, model_name)`` from a file written by `save_compressed`."""
    from workbench.compress import apply
    from workbench.zoo import load

    header = read_header(path)
    plan = Plan.from_dict(header["plan"])
    task = load(header["model"])
    model = apply(task.model, plan, calibration_inputs=task.calibration_inputs())
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WorkbenchError(f"{str(path)!r}: cannot read weights ({exc})") from None
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise WorkbenchError(f"{str(path)!r} does not fit the plan's structure; mismatched keys: {sorted(missing)[:10]}")
    model.load_state_dict(state)
    return model.eval(), plan, header["model"]
