"""Save a compressed model as one safetensors file (weights + plan in its header) and load it back.

File layout
-----------
One ``.safetensors`` file. Its tensors are the compressed model's ``state_dict`` (factors, packed
integer codes, sparse values: whatever the layers really store). Its string metadata holds one
JSON header under the key ``"workbench"``::

    {"format_version": 3,
     "model": "digits-mlp",              # embedded model name, or the user's label
     "source": "embedded" | "user",       # how the original is found again at load time
     "original": {"fingerprint": sha256, "shapes": {layer: [out, in]}},   # of the *original*
     "input": {"shape": [1, 64], "dtype": "float32"} | null,
     "plan": Plan.to_dict(),
     "encoded": {state key: how a non-plain entry (quantized tensor, packed tuple) was stored},
     "tied": {state key: the key it is stored under},   # format 3; {} without ties
     "versions": {"workbench", "torch", "safetensors"}}

Nothing in the file is executed: safetensors holds tensors and strings only.

Tied weights (one tensor under several state keys: ``dec.weight = enc.weight``, or a tied group
compressed as one) are stored once, under the first of their keys (`workbench.ties.store_once`);
``"tied"`` maps each other key to that one, and loading fills them in again before the weights go
into the rebuilt structure, where `workbench.apply` has restored the ties (the deep copy keeps
them; a compressed group is one module at every name). Files of format 2 hold no ties.

Loading = rebuild the structure, then load the weights
------------------------------------------------------
The structure of a compressed model is fully determined by the original architecture and the
plan (ranks, bits, kept channels are all plan parameters). Loading therefore applies the plan to
the original model (`workbench.apply`) and then overwrites *every* tensor with the saved one
(``load_state_dict(strict=True)`` after a key-and-shape check). What the builders computed from
the original weights is thrown away, so the result is bit-identical to the saved model.

*Data-aware methods* (``Method.needs_inputs``, e.g. activation-aware SVD) need calibration inputs
to build, but only their **values** depend on that data, not their shapes. The rebuild therefore
does not need the user's calibration data: it feeds seeded random inputs of the recorded input
shape (or the embedded model's own calibration split, or what the caller passes). The weights
computed from them are discarded. A method whose *shapes* depended on data would be caught by the
shape check below and reported, never loaded half-way. (A cheaper registry path that builds an
uninitialised skeleton per method was considered; it would need every family to write a second
builder, and the rebuild costs well under a second for the models here, so we do not.)

Originals
---------
* Embedded models (``source="embedded"``) are rebuilt from the zoo by name: ``load_compressed(path)``.
* Models the user brought (an ``nn.Module`` or a file, see `workbench.load`) cannot be rebuilt from
  a name: the file records their fingerprint (layer names + shapes) and ``load_compressed`` needs
  ``original=the uncompressed model``; a different model is refused by the fingerprint check.
  We chose this over pickling the architecture because pickles execute code on load.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import safetensors
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.compress import apply
from workbench.errors import WorkbenchError
from workbench.plan import Plan
from workbench.registry import get_method
from workbench.ties import store_once
from workbench.version import __version__
from workbench.zoo import available_models, load

EXPORT_FORMAT_VERSION = 3  # 3: "tied" (tensors shared by several keys stored once)
HEADER_KEY = "workbench"
#: Seed of the stand-in calibration inputs used to rebuild data-aware layers (values discarded).
REBUILD_SEED = 0
REBUILD_SAMPLES = 64


class Loaded(NamedTuple):
    """What `load_compressed` returns; unpacks as ``model, plan, model_name``."""

    model: nn.Module
    plan: Plan
    model_name: str


# --------------------------------------------------------------------------- atomic writes
def check_writable_dir(folder: str | os.PathLike, create: bool = False) -> Path:
    """``folder`` as a Path after checking that files can be created in it.

    ``create``: make it (and parents) first if missing. Raises `WorkbenchError` otherwise.
    """
    folder = Path(folder)
    if create and not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkbenchError(f"cannot create output folder {str(folder)!r}: {exc.strerror or exc}") from None
    if not folder.is_dir():
        raise WorkbenchError(f"output folder {str(folder)!r} does not exist (or is not a folder)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WorkbenchError(f"output folder {str(folder)!r} is not writable")
    return folder


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` on a temporary name beside ``path``, then rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was (absent or old).
    """
    path = Path(path)
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise WorkbenchError(f"cannot write in {str(path.parent)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        raise WorkbenchError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# --------------------------------------------------------------------------- fingerprints
def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{state key: shape}`` of every tensor in ``model.state_dict()`` (plain tensors only)."""
    return {k: list(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def fingerprint(model: nn.Module) -> str:
    """sha256 of the sorted ``(state key, shape, dtype)`` list: the architecture, not the values."""
    items = sorted((k, list(v.shape), str(v.dtype)) for k, v in model.state_dict().items()
                   if isinstance(v, torch.Tensor))
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def check_plan_fits(model: nn.Module, plan: Plan, shapes: dict[str, list[int]] | None = None,
                    what: str = "plan") -> None:
    """Raise `WorkbenchError` unless every layer named by ``plan`` exists in ``model`` and, when
    ``shapes`` (``{layer: weight shape}`` recorded with the plan) is given, has that shape."""
    names = dict(model.named_modules())
    missing = [name for name in plan.layers if name not in names]
    if missing:
        known = ", ".join(n for n, m in names.items() if n and any(True for _ in m.parameters(recurse=False)))
        raise WorkbenchError(f"the {what} names layers {missing} that this model does not have "
                             f"(it was made for a different model); this model's layers: {known}")
    for name, shape in (shapes or {}).items():
        module = names.get(name)
        weight = getattr(module, "weight", None)
        if module is None or not isinstance(weight, torch.Tensor):
            raise WorkbenchError(f"the {what} was made for a different model, with a weighted layer {name!r}; "
                                 "this model has none")
        if list(weight.shape) != list(shape):
            raise WorkbenchError(f"the {what} was made for a different model: layer {name!r} has weight "
                                 f"shape {list(shape)} there but {list(weight.shape)} here")


def plan_layer_shapes(model: nn.Module, plan: Plan) -> dict[str, list[int]]:
    """``{layer: weight shape}`` in ``model`` of the layers ``plan`` changes (recorded with a plan)."""
    shapes = {}
    for name in plan.layers:
        try:
            weight = getattr(model.get_submodule(name), "weight", None)
        except AttributeError:
            continue
        if isinstance(weight, torch.Tensor):
            shapes[name] = list(weight.shape)
    return shapes


# --------------------------------------------------------------------------- state encoding
def _encode_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain tensors for safetensors, plus a recipe for entries that are not plain tensors.

    Handles quantized tensors (stored as ``int_repr`` + scales + zero points) and tuples of them
    (torch.ao packed parameters), ``None`` and ``torch.dtype`` entries. Anything else is refused.
    """
    tensors: dict[str, torch.Tensor] = {}
    encoded: dict[str, Any] = {}

    def one(key: str, value: Any) -> dict | None:
        if value is None:
            return {"kind": "none"}
        if isinstance(value, torch.dtype):
            return {"kind": "dtype", "value": str(value).removeprefix("torch.")}
        if isinstance(value, torch.Tensor) and value.is_quantized:
            tensors[key + "::int_repr"] = value.int_repr().contiguous()
            spec = {"kind": "qtensor", "dtype": str(value.dtype).removeprefix("torch.")}
            if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                spec.update(scale=float(value.q_scale()), zero_point=int(value.q_zero_point()))
            else:
                tensors[key + "::scales"] = value.q_per_channel_scales().contiguous()
                tensors[key + "::zero_points"] = value.q_per_channel_zero_points().contiguous()
                spec["axis"] = int(value.q_per_channel_axis())
            return spec
        if type(value) is torch.Tensor or type(value) is nn.Parameter:
            return None
        if isinstance(value, (tuple, list)):
            items = []
            for i, item in enumerate(value):
                sub = one(f"{key}::{i}", item)
                if sub is None:
                    tensors[f"{key}::{i}"] = item.detach().contiguous()
                    sub = {"kind": "tensor"}
                items.append(sub)
            return {"kind": "tuple", "items": items}
        raise WorkbenchError(f"state entry {key!r} is a {type(value).__name__}, which the safetensors "
                             "export cannot store (plain and quantized tensors, tuples of them only)")

    for key, value in state.items():
        spec = one(key, value)
        if spec is None:
            tensors[key] = value.detach().contiguous()
        else:
            encoded[key] = spec
    return tensors, encoded


def _decode_state(tensors: dict[str, torch.Tensor], encoded: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {k: v for k, v in tensors.items() if "::" not in k}

    def one(key: str, spec: dict) -> Any:
        kind = spec["kind"]
        if kind == "none":
            return None
        if kind == "dtype":
            return getattr(torch, spec["value"])
        if kind == "tensor":
            return tensors[key]
        if kind == "qtensor":
            codes = tensors[key + "::int_repr"]
            if "axis" in spec:
                return torch._make_per_channel_quantized_tensor(
                    codes, tensors[key + "::scales"], tensors[key + "::zero_points"], spec["axis"])
            return torch._make_per_tensor_quantized_tensor(codes, spec["scale"], spec["zero_point"])
        if kind == "tuple":
            return tuple(one(f"{key}::{i}", item) for i, item in enumerate(spec["items"]))
        raise WorkbenchError(f"state entry {key!r} has an unknown encoding {kind!r}")

    try:
        for key, spec in encoded.items():
            state[key] = one(key, spec)
    except KeyError as exc:
        raise WorkbenchError(f"the file lacks tensor {exc.args[0]!r} that its header lists") from None
    return state


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, tuple):
        return [_shape_of(v) for v in value]
    return None


# --------------------------------------------------------------------------- save
def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{name: SHA-256 hex}`` of each tensor's raw bytes (written in the header, checked on load)."""

    return {name: hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in sorted(tensors.items())}


def plan_sidecar(path: str | os.PathLike) -> Path:
    """Where `save_compressed` writes the human-readable plan of ``path`` (``x.safetensors`` ->
    ``x.plan.json``); the file itself carries the same header, so loading never needs it."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".plan.json")


def _versions() -> dict:
    return {"workbench": __version__, "torch": torch.__version__,
            "safetensors": safetensors.__version__}


def save_compressed(path: str | os.PathLike, model: nn.Module, plan: Plan, model_name: str = "model",
                    *, original: nn.Module | None = None,
                    example_input: torch.Tensor | None = None) -> Path:
    """Write ``model``'s weights and ``plan`` to ``path`` (one .safetensors file) atomically.

    Parameters
    ----------
    model : the compressed model (``apply(original, plan)``, maybe fine-tuned afterwards).
    plan : the plan that built it.
    model_name : an embedded model's name (then ``load_compressed(path)`` finds it again), or a
        label for a model the user brought.
    original : the uncompressed model. Recorded as a fingerprint so that loading refuses a
        different one; required when ``model_name`` is not an embedded model.
    example_input : ``(1, ...)``; its shape lets the rebuild of data-aware layers use stand-in
        inputs instead of real calibration data.

    Returns the path written. Raises `WorkbenchError` (nothing written) if the folder is not
    writable or a state entry cannot be stored.
    """
    if not isinstance(plan, Plan):
        raise WorkbenchError(f"save_compressed needs a workbench.Plan, got {type(plan).__name__}")
    source = "embedded" if model_name in available_models() else "user"
    if source == "user" and original is None:
        raise WorkbenchError(f"model {model_name!r} is not an embedded model ({', '.join(available_models())}); "
                             "pass original=the uncompressed model so the file can be checked and loaded")
    path = Path(path)
    check_writable_dir(path.parent if str(path.parent) else Path("."))
    tensors, encoded = _encode_state(model.state_dict())
    tensors, tied = store_once(tensors)  # a tied tensor once, under its first key
    tensors = {key: tensor.cpu() for key, tensor in tensors.items()}  # a file holds CPU tensors
    header = {"format_version": EXPORT_FORMAT_VERSION, "model": model_name, "source": source,
              "original": None if original is None else {
                  "fingerprint": fingerprint(original), "shapes": plan_layer_shapes(original, plan)},
              "input": None if example_input is None else {
                  "shape": list(example_input.shape), "dtype": str(example_input.dtype).removeprefix("torch.")},
              "plan": plan.to_dict(), "encoded": encoded, "tied": tied, "versions": _versions(),
              "sha256": tensor_digests(tensors)}
    written = atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(header)}))
    readable = {k: v for k, v in header.items() if k not in ("encoded", "tied", "sha256")}
    atomic_write(plan_sidecar(path), lambda tmp: Path(tmp).write_text(json.dumps(readable, indent=1) + "\n"))
    return written


# --------------------------------------------------------------------------- load
def read_header(path: str | os.PathLike) -> dict:
    """The workbench header of a saved file, validated (format version, required keys)."""
    if not Path(path).is_file():
        raise WorkbenchError(f"no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WorkbenchError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupted?): "
                             f"{exc}") from None
    if HEADER_KEY not in metadata:
        raise WorkbenchError(f"{str(path)!r} is a safetensors file but not one saved by the workbench "
                             f"(no {HEADER_KEY!r} metadata)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as exc:
        raise WorkbenchError(f"{str(path)!r}: the workbench header is not valid JSON ({exc})") from None
    version = header.get("format_version") if isinstance(header, dict) else None
    if not isinstance(version, int):
        raise WorkbenchError(f"{str(path)!r}: the workbench header has no integer format_version")
    if version > EXPORT_FORMAT_VERSION:
        raise WorkbenchError(f"{str(path)!r} has format_version={version}, newer than this workbench reads "
                             f"(up to {EXPORT_FORMAT_VERSION}); upgrade compression-workbench")
    for key in ("model", "plan"):
        if key not in header:
            raise WorkbenchError(f"{str(path)!r}: the workbench header lacks {key!r}")
    header.setdefault("source", "embedded")  # format 1 saved embedded models only
    return header


def _stand_in_inputs(header: dict, task) -> torch.Tensor | None:
    """Inputs to build data-aware layers with; their values are discarded (see module docstring)."""
    if task is not None:
        return task.calibration_inputs(REBUILD_SAMPLES)
    spec = header.get("input")
    if not spec:
        return None
    dtype = getattr(torch, spec["dtype"])
    generator = torch.Generator().manual_seed(REBUILD_SEED)
    shape = (REBUILD_SAMPLES, *spec["shape"][1:])
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def rebuild_structure(header: dict, original: nn.Module | None = None,
                      calibration_inputs: torch.Tensor | None = None) -> nn.Module:
    """The compressed model's structure: ``apply(original, plan)``; weights still to be loaded."""
    plan = Plan.from_dict(header["plan"])
    task = None
    if original is None:
        if header["source"] != "embedded":
            raise WorkbenchError(
                f"this file was saved from a model you brought ({header['model']!r}); pass the "
                "uncompressed model: load_compressed(path, original=model)")
        task = load(header["model"])
        original = task.model
    recorded = header.get("original") or {}
    given, what = type(original).__name__, f"file (made for {header['model']!r}, given a {type(original).__name__})"
    if recorded.get("fingerprint") and recorded["fingerprint"] != fingerprint(original):
        check_plan_fits(original, plan, recorded.get("shapes"), what=what)
        raise WorkbenchError(f"the file was compressed from {header['model']!r}, not from the {given} given as original")
    check_plan_fits(original, plan, recorded.get("shapes"), what=what)
    needs = any(get_method(c.method).needs_inputs and get_method(c.method).skeleton is None
                for c in plan.layers.values())
    inputs = calibration_inputs
    if needs and inputs is None:
        inputs = _stand_in_inputs(header, task)
        if inputs is None:
            raise WorkbenchError("the plan uses a data-aware method and the file records no input shape; "
                                 "pass calibration_inputs= (any inputs of the right shape: only the "
                                 "structure is rebuilt from them, the weights come from the file)")
    torch.manual_seed(REBUILD_SEED)
    return apply(original, plan, calibration_inputs=inputs, structure_only=True)


def load_compressed(path: str | os.PathLike, original: nn.Module | None = None,
                    calibration_inputs: torch.Tensor | None = None) -> Loaded:
    """``Loaded(model, plan, model_name)`` from a file written by `save_compressed`.

    ``original``: the uncompressed model; needed for models the user brought (the file records a
    fingerprint and refuses another model), optional for embedded models (loaded by name).
    ``calibration_inputs``: only for data-aware plans of user models saved without an example
    input; their values do not matter. Raises `WorkbenchError` for a missing, truncated or
    corrupted file, a newer format, or a file that does not fit the model.
    """
    header = read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise WorkbenchError(f"{str(path)!r}: cannot read the weights (truncated or corrupted?): {exc}") from None
    recorded = header.get("sha256")  # files written before checksums were recorded have none
    if recorded is not None:
        damaged = [name for name, digest in tensor_digests(tensors).items() if recorded.get(name) != digest]
        damaged += sorted(set(recorded) - set(tensors))
        if damaged:
            raise WorkbenchError(f"{str(path)!r} is corrupted: the bytes of {len(damaged)} tensor(s) do not match "
                                 f"the checksums written with them ({', '.join(damaged[:5])})")
    for key, kept in (header.get("tied") or {}).items():  # tied tensors were stored once
        if kept not in tensors:
            raise WorkbenchError(f"{str(path)!r} is corrupted: {key!r} is stored as {kept!r}, which the file lacks")
        tensors[key] = tensors[kept]
    state = _decode_state(tensors, header.get("encoded", {}))
    model = rebuild_structure(header, original, calibration_inputs)
    expected = model.state_dict()
    extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
    if extra or missing:
        raise WorkbenchError(f"{str(path)!r} does not fit the structure its plan builds on this model: "
                             f"keys only in the file {extra[:8]}, only in the model {missing[:8]}")
    for key, value in expected.items():
        if _shape_of(value) != _shape_of(state[key]):
            raise WorkbenchError(f"{str(path)!r} does not fit the structure its plan builds: {key!r} has "
                                 f"shape {_shape_of(state[key])} in the file, {_shape_of(value)} in the model")
    # Module versions (``state_dict._metadata``) come from the rebuilt structure: some modules
    # (torch.ao packed params) read their layout version from it.
    state = OrderedDict(state)
    state._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
    return Loaded(model.eval(), Plan.from_dict(header["plan"]), header["model"])
