"""The user's own models: ``workbench.load(module_or_path, ...) -> Task``.

Accepted sources:

* an ``nn.Module`` object (e.g. from the notebook);
* a ``torch.save(model.state_dict())`` file or a ``.safetensors`` file, plus ``constructor``: a
  callable (or ``"package.module:function"``) returning the model to load the weights into;
* a TorchScript file (``torch.jit.save``).

Files are read with ``torch.load(..., weights_only=True)`` or safetensors only: a pickle that
would run code when loaded (e.g. a whole model saved with ``torch.save(model)``) is refused with a
clear message and never executed.

Evaluation: ``eval_data`` is a DataLoader (batches ``x`` or ``(x, y, ...)``), a tensor ``x`` or a
pair ``(x, y)``; ``metric(outputs, targets) -> float`` is the user's. Without a metric (or
without targets) the metric is output fidelity: mean cosine similarity of each sample's output
to the original model's output on the same data.
"""
from __future__ import annotations

import importlib
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers, shared_weight_groups, skip_reason
from workbench.zoo.task import Task
from safetensors.torch import load_file
from workbench.layers.recurrent import unsupported_reason

FIDELITY_NAME = "output fidelity (mean cosine to original)"


def output_fidelity(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity between each sample's flattened output and the reference ``(n, ...)``."""
    a, b = outputs.reshape(len(outputs), -1).double(), reference.reshape(len(reference), -1).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


# ---- constructing and reading files ---------------------------------------------------------

def resolve_constructor(constructor: Callable[[], nn.Module] | str | None, path: Path) -> nn.Module:
    """Call the user's ``constructor`` (a callable, or ``"module:function"`` to import) -> model."""
    if constructor is None:
        raise WorkbenchError(
            f"{path.name} holds weights only (a state_dict); say which model they belong to with "
            "constructor=MyNet (a callable returning the nn.Module) or constructor='package.module:MyNet'")
    if isinstance(constructor, str):
        module_name, sep, attr = constructor.partition(":")
        if not sep or not module_name or not attr:
            raise WorkbenchError(f"constructor={constructor!r} must look like 'package.module:function'")
        try:
            constructor = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise WorkbenchError(f"constructor={constructor!r} cannot be imported: {exc}") from None
    if not callable(constructor):
        raise WorkbenchError(f"constructor must be callable; got {type(constructor).__name__}")
    model = constructor()
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"constructor returned {type(model).__name__}, not an nn.Module")
    return model


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``torch.save`` file, read without executing any code."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise WorkbenchError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WorkbenchError(
            f"refused to load {path}: unpickling it would run code or build arbitrary Python objects "
            f"({str(exc).splitlines()[0][:200]}). The workbench loads with weights_only=True and never "
            "executes such files. Save the weights instead: torch.save(model.state_dict(), path), "
            "then load(path, constructor=YourModel)") from None
    except Exception as exc:  # noqa: BLE001  (any other failure: not a torch file, or truncated)
        raise WorkbenchError(f"{path} is not a model file torch can read (truncated or another format?): "
                             f"{str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common checkpoint layout {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WorkbenchError(f"{path} does not hold a state_dict (a dict of tensors); got {type(state).__name__}")
    return state


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; a mismatch raises, listing missing/unexpected keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in the file: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:10])}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:10])}")
        raise WorkbenchError(f"the weights in {source} do not fit {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(source: Any, constructor: Callable[[], nn.Module] | str | None = None) -> nn.Module:
    """An ``nn.Module`` from a module object or a file path (see the module docstring)."""
    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    if not path.is_file():
        raise WorkbenchError(f"no file at {str(path)!r}")
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise WorkbenchError(f"{path} looks like TorchScript but cannot be loaded: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
    state = read_state_dict(path)
    model = resolve_constructor(constructor, path)
    fit_state_dict(model, state, str(path))
    return model


# ---- evaluation data -------------------------------------------------------------------------

def eval_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets or None)`` from a DataLoader, a tensor, or an ``(x, y)`` pair."""
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise WorkbenchError(f"eval_data inputs have {len(data[0])} samples but targets {len(data[1])}")
        return data[0], data[1]
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys = [], []
        for batch in data:
            if isinstance(batch, torch.Tensor):
                xs.append(batch)
            elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
                xs.append(batch[0])
                if len(batch) > 1 and isinstance(batch[1], torch.Tensor):
                    ys.append(batch[1])
            else:
                raise WorkbenchError(f"DataLoader batches must be tensors or (inputs, targets) tuples; "
                                     f"got {type(batch).__name__}")
        if not xs:
            raise WorkbenchError("the DataLoader yielded no batches")
        return torch.cat(xs), (torch.cat(ys) if len(ys) == len(xs) else None)
    raise WorkbenchError(f"eval_data must be a DataLoader, a tensor or an (inputs, targets) pair; "
                         f"got {type(data).__name__}")


# ---- what can be compressed ------------------------------------------------------------------

def skipped_layers(model: nn.Module) -> list[dict]:
    """Modules holding weights that the matrix methods leave alone: ``[{name, type, reason}]``."""
    offered = {info.name for info in matrix_layers(model)}
    tied = {name: group for group in shared_weight_groups(model) for name in group}
    rows = []
    for name, module in model.named_modules():
        if name in offered or not any(True for _ in module.parameters(recurse=False)):
            continue
        if name in tied:
            others = [n for n in tied[name] if n != name]
            reason = f"weight shared with {', '.join(others)} (tied): left dense so it is not duplicated"
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            reason = skip_reason(module) or "not offered"
        elif isinstance(module, nn.Embedding):
            reason = "embedding: a lookup table, not a matrix product"
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            reason = "normalisation layer: few weights, needed for stability"
        elif isinstance(module, (nn.GRU, nn.LSTM)):
            why = unsupported_reason(module)
            reason = (f"{type(module).__name__} with {why}: left dense" if why else
                      "recurrent layer: compressed by the svd / svd_rnn methods only")
        else:
            reason = f"{type(module).__name__}: the workbench does not know how it uses its weights"
        rows.append({"name": name or "(model)", "type": type(module).__name__, "reason": reason})
    return rows


def load_user(source: Any, *, constructor: Callable[[], nn.Module] | str | None = None,
              eval_data: Any = None, metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
              metric_name: str | None = None, calibration_data: Any = None, name: str | None = None,
              known: list[str] | None = None) -> Task:
    """A `Task` for the user's model (``source``: nn.Module or path) and evaluation data.

    ``eval_data`` is required (a DataLoader, a tensor or ``(x, y)``); ``metric(outputs, targets)``
    is used when targets exist, otherwise output fidelity to the original. ``calibration_data``
    (same forms) feeds data-aware methods; by default the evaluation inputs are used.
    ``task.extras["skipped"]`` lists the layers left alone and why.
    """
    if isinstance(source, str) and not Path(source).exists():
        listing = ", ".join(known or [])
        raise WorkbenchError(f"unknown model {source!r}; embedded models are: {listing}; "
                             "or give an nn.Module or the path of a model file")
    if not isinstance(source, (nn.Module, str, Path)):
        raise WorkbenchError(f"load() takes an embedded model name, an nn.Module or a path; "
                             f"got {type(source).__name__}")
    model = load_model(source, constructor).eval()
    if eval_data is None:
        raise WorkbenchError("give eval_data (a DataLoader, a tensor, or (inputs, targets)) so the "
                             "workbench can measure what compression does to your model")
    inputs, targets = eval_tensors(eval_data)
    try:
        with torch.no_grad():
            model(inputs[:1])
    except Exception as exc:  # the user's model decides what fails; report it with the shape
        raise WorkbenchError(f"evaluation data of shape {tuple(inputs.shape)} does not fit the model: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    train_inputs = eval_tensors(calibration_data)[0] if calibration_data is not None else None
    label = name or (Path(source).stem if not isinstance(source, nn.Module) else type(source).__name__)
    task = Task(name=label, model=model, eval_inputs=inputs, eval_targets=torch.empty(0),
                metric=output_fidelity, metric_name=FIDELITY_NAME, train_inputs=train_inputs,
                description=f"user model {label}", extras={"skipped": skipped_layers(model)})
    if metric is not None and targets is not None:
        task.eval_targets, task.metric = targets, metric
        task.metric_name = metric_name or getattr(metric, "__name__", "metric")
    else:
        task.eval_targets = task.outputs()
    return task
