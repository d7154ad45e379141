"""``compress MODEL --plan FILE``: read a saved plan and check that it fits the model.

FILE may hold a bare plan (``Plan.to_json``), the JSON of ``allocate --json`` or ``compress
--json`` (the plan under ``"plan"``, the model it was made for under ``"model"``), or a widget
configuration (``{"kind": "workbench-configuration", "layer_shapes": ..., "plan": ...}``,
`workbench.widgets.configuration`, whose format constants this reads; no ipywidgets is imported).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from workbench.errors import WorkbenchError
from workbench.export import check_plan_fits
from workbench.plan import Plan
from workbench.widgets.configuration import CONFIG_FORMAT_VERSION, CONFIG_KIND


@dataclass(frozen=True)
class PlanFile:
    """A plan read from ``path``; ``made_for``: the model name recorded beside it (None if none);
    ``layer_shapes``: ``{layer: weight shape}`` recorded with it (a configuration only)."""

    path: str
    plan: Plan
    made_for: str | None = None
    layer_shapes: dict | None = None


def _plan_part(data: dict, where: str) -> tuple[dict, str | None, dict | None]:
    """``(plan dict, model name, layer shapes)`` of one of the accepted layouts."""
    if data.get("kind") == CONFIG_KIND:
        version = data.get("format_version")
        if not isinstance(version, int) or version > CONFIG_FORMAT_VERSION:
            raise WorkbenchError(f"{where} has configuration format_version={version!r}, newer than this "
                                 f"workbench reads (up to {CONFIG_FORMAT_VERSION}); upgrade compression-workbench")
        return data.get("plan") or {}, data.get("model"), data.get("layer_shapes") or None
    if isinstance(data.get("plan"), dict):  # allocate --json / compress --json
        model = data.get("model")
        return data["plan"], model if isinstance(model, str) else None, None
    if "layers" in data or "steps" in data:  # Plan.to_json
        return data, None, None
    raise WorkbenchError(f"{where} holds no plan: expected a plan (keys 'layers', 'steps'), the JSON of "
                         f"allocate/compress --json (key 'plan') or a widget configuration; got keys {sorted(data)[:8]}")


def read_plan_file(path: str) -> PlanFile:
    """Parse ``path``; raises `WorkbenchError` (one line naming the file) on a missing file, bad
    JSON, an unknown layout, a malformed plan or a newer format version."""
    where = f"--plan {path!r}"
    file = Path(path)
    if not file.is_file():
        raise WorkbenchError(f"{where}: no such file")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{where} is not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"{where} holds a JSON {type(data).__name__}, not a plan object")
    part, made_for, shapes = _plan_part(data, where)
    layers, steps = part.get("layers", {}), part.get("steps", [])
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise WorkbenchError(f"{where}: 'layers' must map each layer name to an object like "
                             f'{{"method": "svd", "rank": 8}}')
    if not isinstance(steps, list) or not all(isinstance(v, dict) for v in steps):
        raise WorkbenchError(f"{where}: 'steps' must be a list of objects like {{\"method\": ..., ...}}")
    try:
        plan = Plan.from_dict(part)
    except WorkbenchError as exc:
        raise WorkbenchError(f"{where}: {exc}") from None
    return PlanFile(path, plan, made_for, shapes)


def check_fits(plan_file: PlanFile, model: nn.Module, model_name: str) -> None:
    """Refuse a plan whose layers (or recorded weight shapes) are not those of ``model``,
    naming the file, the model it was made for (when recorded) and ``model_name``."""
    made_for = f" (made for {plan_file.made_for})" if plan_file.made_for else ""
    try:
        check_plan_fits(model, plan_file.plan, plan_file.layer_shapes, what="plan")
    except WorkbenchError as exc:
        raise WorkbenchError(f"--plan {plan_file.path!r}{made_for} does not fit {model_name}: {exc}") from None
