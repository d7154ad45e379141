"""Configuration files, the compute half of "Save this configuration": no widgets here.

* `configuration_text` / `parse_configuration`: a plan (with the shapes of its layers and the view
  state) to JSON text and back. Parsing is strict: at most `MAX_CONFIGURATION_BYTES`, UTF-8 JSON
  without NaN / Infinity or repeated keys, only the known keys with their types (kind,
  format_version, model, layer_shapes, plan, state), checked against the model. Nothing in a file
  is ever executed or trusted beyond this schema.
* `configuration_file(folder, name)`: the path of a file NAME inside a configurations folder; a
  path (absolute, ``..``, separators), a symlink leading out of the folder or a non-``.json``
  name is refused.
* `in_app()`: whether this kernel serves a web app (Voilà), where files go through the visitor's
  browser instead of the server's disk.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from workbench.errors import WorkbenchError
from workbench.export import atomic_write, check_plan_fits, plan_layer_shapes
from workbench.plan import Plan

CONFIG_KIND = "workbench-configuration"
CONFIG_FORMAT_VERSION = 1
DEFAULT_NAME = "workbench-configuration.json"
CONFIG_FOLDER = "configurations"
MAX_CONFIGURATION_BYTES = 1 << 20  # 1 MiB: a plan for thousands of layers is ~100 KiB
#: Set by ``python -m workbench app`` for the kernels Voilà starts; Voilà sets the others itself.
APP_ENV_MARKERS = ("WORKBENCH_APP", "VOILA_REQUEST_URL", "VOILA_SERVER_URL")
_TOP_KEYS = {"kind", "format_version", "model", "layer_shapes", "plan", "state"}
_PLAN_KEYS = {"format_version", "layers", "steps"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,122}\.json")


def in_app(environ: dict | None = None) -> bool:
    """True in a kernel started by Voilà (``WORKBENCH_APP=1`` or Voilà's ``VOILA_*`` variables)."""
    env = os.environ if environ is None else environ
    return env.get("WORKBENCH_APP") == "1" or any(env.get(key) for key in APP_ENV_MARKERS[1:])


def check_name(name: Any) -> str:
    """``name`` if it is a plain ``.json`` file name (letters, digits, ``._ -``, at most 128 chars)."""
    if not isinstance(name, str) or not name:
        raise WorkbenchError(f"file name {name!r} is empty; give a name such as {DEFAULT_NAME!r}")
    if os.path.isabs(name) or re.match(r"[A-Za-z]:", name) or "/" in name or "\\" in name or ".." in name:
        raise WorkbenchError(f"file name {name!r} is a path; give a name only (no folders, no '..'): "
                             f"files are kept in the {CONFIG_FOLDER!r} folder")
    if not name.endswith(".json"):
        raise WorkbenchError(f"file name {name!r} must end with '.json'")
    if not _NAME.fullmatch(name):
        raise WorkbenchError(f"file name {name!r} may hold letters, digits, '.', '_', '-' and spaces only, "
                             "must not start with '.', and at most 128 characters")
    return name


def configuration_file(folder: str | os.PathLike, name: Any) -> Path:
    """``folder / name`` once ``name`` passed `check_name` and the file (if it exists, or is a
    symlink) resolves inside ``folder``. The folder itself need not exist yet."""
    name = check_name(name)
    folder = Path(folder).absolute()
    path = folder / name
    if path.is_symlink() or path.exists():
        target, root = path.resolve(), folder.resolve()
        if not target.is_relative_to(root):
            raise WorkbenchError(f"{name!r} in {str(folder)!r} is a link to {str(target)!r}, outside the folder; "
                                 "refused")
        if not target.is_file():
            raise WorkbenchError(f"{name!r} in {str(folder)!r} is not a regular file")
    return path


def configuration_text(plan: Plan, model: nn.Module | None = None, model_name: str | None = None,
                       state: dict | None = None) -> str:
    """The JSON text of a configuration: ``plan``, the weight shapes in ``model`` of the layers it
    sets, and the view ``state``."""
    if not isinstance(plan, Plan):
        raise WorkbenchError(f"a configuration holds a workbench.Plan, got {type(plan).__name__}")
    data = {"kind": CONFIG_KIND, "format_version": CONFIG_FORMAT_VERSION, "model": model_name,
            "layer_shapes": plan_layer_shapes(model, plan) if model is not None else {},
            "plan": plan.to_dict(), "state": state or {}}
    return json.dumps(data, indent=1, default=str)


def save_configuration(path: str | os.PathLike, plan: Plan, model: nn.Module | None = None,
                       model_name: str | None = None, state: dict | None = None) -> Path:
    """Write `configuration_text` to ``path`` (a temporary name, then renamed); returns the path.

    The Python API: ``path`` is the caller's. The save bar passes `configuration_file` paths only.
    """
    text = configuration_text(plan, model, model_name, state)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_configuration(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[Plan, dict, dict]:
    """``(plan, state, data)`` of the file at ``path``, through `parse_configuration`."""
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"no configuration file {str(path)!r}")
    size = path.stat().st_size
    if size > MAX_CONFIGURATION_BYTES:
        raise WorkbenchError(_too_big(str(path), size))
    return parse_configuration(path.read_bytes(), model, source=str(path))


def _too_big(source: str, size: int) -> str:
    return (f"{source!r} is {size:,} bytes; a configuration is at most {MAX_CONFIGURATION_BYTES:,} bytes "
            f"({MAX_CONFIGURATION_BYTES >> 20} MiB)")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed in a configuration")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"keys {repeated} appear more than once")
    return dict(pairs)


def _is_value(value: Any, depth: int = 0) -> bool:
    """A setting: JSON scalar or a (nested, at most 4 deep) list of them; no objects."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, list) and depth < 4 and all(_is_value(v, depth + 1) for v in value)


def _check_entry(entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise WorkbenchError(f"{where} must be an object with a 'method' name, got {json.dumps(entry)[:80]}")
    bad = [k for k, v in entry.items() if not _is_value(v)]
    if bad:
        raise WorkbenchError(f"{where}: settings {bad} must be numbers, strings, booleans or lists of them")


def _check_plan(plan: Any, source: str) -> Plan:
    if not isinstance(plan, dict):
        raise WorkbenchError(f"{source!r}: 'plan' must be an object, got {type(plan).__name__}")
    unknown = sorted(set(plan) - _PLAN_KEYS)
    if unknown:
        raise WorkbenchError(f"{source!r}: the plan has unknown keys {unknown} (allowed: {sorted(_PLAN_KEYS)})")
    layers, steps = plan.get("layers", {}), plan.get("steps", [])
    if not isinstance(layers, dict) or not isinstance(steps, list):
        raise WorkbenchError(f"{source!r}: the plan's 'layers' must be an object and 'steps' a list")
    for name, entry in layers.items():
        _check_entry(entry, f"layer {name!r}")
    for i, entry in enumerate(steps):
        _check_entry(entry, f"step {i}")
    return Plan.from_dict(plan)


def _check_shapes(shapes: Any, source: str) -> dict[str, list[int]]:
    ok = isinstance(shapes, dict) and all(
        isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
        for s in shapes.values())
    if not ok:
        raise WorkbenchError(f"{source!r}: 'layer_shapes' must map layer names to lists of sizes")
    return shapes


def parse_configuration(content: bytes | str, model: nn.Module | None = None, source: str = "upload"
                        ) -> tuple[Plan, dict, dict]:
    """``(plan, state, data)`` from the bytes of a configuration file, checked strictly.

    ``content``: at most `MAX_CONFIGURATION_BYTES` bytes of UTF-8 JSON. ``source`` names it in
    messages. With ``model``, every layer the plan names must exist there with the recorded
    weight shape. A bare plan (``Plan.to_json``) is accepted too (no shapes, empty state).
    Raises `WorkbenchError` naming what is wrong; never runs anything the file holds.
    """
    raw = content.encode() if isinstance(content, str) else bytes(content)
    if len(raw) > MAX_CONFIGURATION_BYTES:
        raise WorkbenchError(_too_big(source, len(raw)))
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise WorkbenchError(f"{source!r} is not UTF-8 text: not a configuration file") from None
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise WorkbenchError(f"{source!r} is not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"{source!r} holds a {type(data).__name__}, not a configuration object")
    if "kind" not in data and "layers" in data:  # a bare plan
        data = {"kind": CONFIG_KIND, "format_version": CONFIG_FORMAT_VERSION, "plan": data}
    if data.get("kind") != CONFIG_KIND:
        raise WorkbenchError(f"{source!r} is not a workbench configuration (kind={data.get('kind')!r})")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise WorkbenchError(f"{source!r} has unknown keys {unknown} (a configuration holds {sorted(_TOP_KEYS)})")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise WorkbenchError(f"{source!r} has format_version={version!r}; it must be a whole number from 1")
    if version > CONFIG_FORMAT_VERSION:
        raise WorkbenchError(f"{source!r} has format_version={version!r}, newer than this workbench reads "
                             f"(up to {CONFIG_FORMAT_VERSION}); upgrade compression-workbench")
    if not isinstance(data.get("model"), (str, type(None))):
        raise WorkbenchError(f"{source!r}: 'model' must be a name, got {type(data['model']).__name__}")
    shapes = _check_shapes(data.get("layer_shapes") or {}, source)
    state = data.get("state") or {}
    if not isinstance(state, dict) or not all(isinstance(k, str) and _is_value(v) for k, v in state.items()):
        raise WorkbenchError(f"{source!r}: 'state' must map names to numbers, strings, booleans or lists")
    plan = _check_plan(data.get("plan") or {}, source)
    if model is not None:
        check_plan_fits(model, plan, shapes, what=f"configuration (saved for {data.get('model') or 'another model'})")
    return plan, dict(state), data
