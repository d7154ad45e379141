""""Save this configuration" / "Load": keep what the user set across kernel restarts.

Protocol (any explorer or dashboard can embed `SaveLoadBar`)
-----------------------------------------------------------
The host widget exposes

* ``plan`` (property or trait, or a method ``plan()``): the `Plan` its sliders describe now;
* ``set_plan(plan)``: move its sliders to ``plan`` (and recompute as a slider move would);
* optionally ``task`` (a `Task`) or ``model``: used to record and check layer shapes;
* optionally ``widget_state() -> dict`` / ``set_widget_state(dict)``: extra view state
  (selected layer, toggles) that is not part of the plan.

The compute half (``save_configuration`` / ``load_configuration``) knows no widgets and is
tested alone. A configuration file is JSON::

    {"kind": "workbench-configuration", "format_version": 1, "model": "digits-mlp",
     "layer_shapes": {"fc1": [256, 64], ...}, "plan": Plan.to_dict(), "state": {...}}

Loading refuses (with a message, never a traceback in the widget) a file that is not JSON, is
of a newer format, or was made for another model (layer names or shapes differ).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from torch import nn

from workbench.errors import WorkbenchError
from workbench.widgets.throttle import error_message
from workbench.export import atomic_write, check_plan_fits, plan_layer_shapes
from workbench.plan import Plan

CONFIG_KIND = "workbench-configuration"
CONFIG_FORMAT_VERSION = 1
DEFAULT_PATH = "workbench-configuration.json"


def save_configuration(path: str | os.PathLike, plan: Plan, model: nn.Module | None = None,
                       model_name: str | None = None, state: dict | None = None) -> Path:
    """Write ``plan`` (with the shapes of its layers in ``model`` and the view ``state``) to ``path``.

    Written to a temporary name, then renamed; raises `WorkbenchError` if the folder is not writable.
    """
    if not isinstance(plan, Plan):
        raise WorkbenchError(f"a configuration holds a workbench.Plan, got {type(plan).__name__}")
    data = {"kind": CONFIG_KIND, "format_version": CONFIG_FORMAT_VERSION, "model": model_name,
            "layer_shapes": plan_layer_shapes(model, plan) if model is not None else {},
            "plan": plan.to_dict(), "state": state or {}}
    text = json.dumps(data, indent=1, default=str)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_configuration(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[Plan, dict, dict]:
    """``(plan, state, data)`` from a file written by `save_configuration`.

    With ``model``, every layer the plan names must exist there with the recorded weight shape.
    A bare plan file (``Plan.to_json``) is accepted too (no shapes to check, empty state).
    """
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"no configuration file {str(path)!r}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkbenchError(f"{str(path)!r} is not valid JSON (truncated or corrupted?): {exc}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"{str(path)!r} holds a {type(data).__name__}, not a configuration object")
    if data.get("kind") != CONFIG_KIND:
        if "layers" in data:  # a bare plan
            data = {"kind": CONFIG_KIND, "format_version": CONFIG_FORMAT_VERSION, "plan": data}
        else:
            raise WorkbenchError(f"{str(path)!r} is not a workbench configuration (kind={data.get('kind')!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version > CONFIG_FORMAT_VERSION:
        raise WorkbenchError(f"{str(path)!r} has format_version={version!r}, newer than this workbench reads "
                             f"(up to {CONFIG_FORMAT_VERSION}); upgrade compression-workbench")
    plan = Plan.from_dict(data.get("plan") or {})
    if model is not None:
        check_plan_fits(model, plan, data.get("layer_shapes"),
                        what=f"configuration (saved for {data.get('model') or 'another model'})")
    return plan, dict(data.get("state") or {}), data


def _host_model(host: Any) -> tuple[nn.Module | None, str | None]:
    task = getattr(host, "task", None)
    if task is not None and isinstance(getattr(task, "model", None), nn.Module):
        return task.model, getattr(task, "name", None)
    model = getattr(host, "model", None)
    return (model, None) if isinstance(model, nn.Module) else (None, None)


def host_plan(host: Any) -> Plan:
    """The host's current plan, whether ``plan`` is a property/trait or a method."""
    plan = host.plan
    plan = plan() if callable(plan) else plan
    if not isinstance(plan, Plan):
        raise WorkbenchError(f"{type(host).__name__}.plan gave a {type(plan).__name__}, not a workbench.Plan")
    return plan


def slider_values_for_plan(knobs, plan: Plan) -> dict[str, int]:
    """``{layer: slider value}`` reproducing ``plan`` on rank knobs (`workbench.widgets.dashboard.Knob`:
    ``layer``, ``layers`` it sets (a tied group's members), ``maximum`` = dense, ``to_choice(value)
    -> LayerPlan``). Raises `WorkbenchError` for a layer without a knob, a setting no slider value
    gives, or a tied group whose members the plan sets differently."""
    by_layer = {knob.layer: knob for knob in knobs}
    covered = {name for knob in knobs for name in knob.layers}
    unknown = [name for name in plan.layers if name not in covered]
    if unknown or plan.steps:
        raise WorkbenchError(f"the plan sets {unknown or [s.method for s in plan.steps]}, which these sliders "
                             f"cannot show; sliders: {', '.join(by_layer)}")
    values = {}
    for layer, knob in by_layer.items():
        members = knob.layers
        if len({plan.layers.get(name) for name in members}) > 1:
            raise WorkbenchError(f"the plan gives the tied layers {list(members)} different settings "
                                 f"({', '.join(f'{n}: {plan.layers.get(n)}' for n in members)}); one slider sets them all")
        choice = plan.layers.get(layer)
        if choice is None:
            values[layer] = knob.maximum
            continue
        rank = choice.get("rank")
        candidates = [rank] if isinstance(rank, int) and 1 <= rank < knob.maximum else range(1, knob.maximum)
        match = next((r for r in candidates if knob.to_choice(r) == choice), None)
        if match is None:
            raise WorkbenchError(f"layer {layer!r}: {choice.to_dict()} is not a setting its slider offers "
                                 f"(ranks 1..{knob.maximum})")
        values[layer] = match
    return values


def check_plan_shape(plan: Plan, explorer: str, layers, method: str, keys, defaults: dict | None = None
                     ) -> dict[str, dict]:
    """``{layer: params}`` of ``plan`` once checked against what an explorer's controls can show.

    Refuses (`WorkbenchError`, naming the value and the rule) whole-model steps, a layer not in
    ``layers``, a method other than ``method``, and a parameter outside ``keys`` unless it equals
    its entry in ``defaults`` (what the explorer applies implicitly; such entries are dropped).
    """
    if plan.steps:
        raise WorkbenchError(f"the plan has whole-model steps {[s.method for s in plan.steps]}, which the "
                             f"{explorer} cannot show")
    unknown = [name for name in plan.layers if name not in layers]
    if unknown:
        raise WorkbenchError(f"the plan sets layers {unknown}, which the {explorer} does not control "
                             f"(it controls {', '.join(layers)})")
    settings = {}
    for name, choice in plan.layers.items():
        if choice.method != method:
            raise WorkbenchError(f"layer {name!r}: method {choice.method!r} is not one the {explorer} shows "
                                 f"(it shows {method!r})")
        params = dict(choice.params)
        for key in [k for k in params if k not in keys]:
            if (defaults or {}).get(key, object()) != params[key]:
                raise WorkbenchError(f"layer {name!r}: {key}={params[key]!r} is not a setting the {explorer} "
                                     f"shows (it shows {', '.join(keys)})")
            del params[key]
        settings[name] = params
    return settings


def check_slider_value(slider: widgets.Widget, value: Any, what: str) -> Any:
    """``value`` if ``slider`` (an Int/Float slider) can show it; else `WorkbenchError` with the range."""
    integer = isinstance(slider, (widgets.IntSlider, widgets.BoundedIntText))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise WorkbenchError(f"{what}={value!r} must be {'an integer' if integer else 'a number'}")
    if not slider.min <= value <= slider.max:
        raise WorkbenchError(f"{what}={value!r} is outside the slider's range {slider.min}..{slider.max}")
    return value


class SaveLoadBar(widgets.VBox):
    """A path box, "Save this configuration" and "Load" buttons, and a status line.

    ``host``: a widget following the protocol in the module docstring. ``save()`` / ``load()``
    are what the buttons call; they return True on success and put any error in ``status``.
    """

    def __init__(self, host: Any, path: str | os.PathLike = DEFAULT_PATH):
        # a `plan` property is looked up on the class, not evaluated (it may raise for the current view)
        has_plan = hasattr(type(host), "plan") or hasattr(host, "plan")
        if not has_plan or not callable(getattr(host, "set_plan", None)):
            raise WorkbenchError(f"{type(host).__name__} cannot be saved: it needs a `plan` property "
                                 "and a `set_plan(plan)` method")
        self.host = host
        self.path = widgets.Text(value=str(path), description="file", layout=widgets.Layout(width="360px"))
        self.save_button = widgets.Button(description="Save this configuration", icon="save",
                                          layout=widgets.Layout(width="220px"))
        self.load_button = widgets.Button(description="Load", icon="folder-open")
        self.status = widgets.HTML(value="")
        self.save_button.on_click(lambda _: self.save())
        self.load_button.on_click(lambda _: self.load())
        super().__init__([widgets.HBox([self.path, self.save_button, self.load_button]), self.status])

    def _report(self, ok: bool, text: str) -> bool:
        color = "#2a7" if ok else "#c33"
        self.status.value = f"<span style='color:{color}'>{text}</span>"
        return ok

    def save(self) -> bool:
        """Write the host's current plan and view state to ``self.path.value``."""
        model, name = _host_model(self.host)
        state = self.host.widget_state() if callable(getattr(self.host, "widget_state", None)) else None
        try:
            plan = host_plan(self.host)
            written = save_configuration(self.path.value, plan, model, name, state)
        except Exception as exc:  # noqa: BLE001 - a message in the widget, never a traceback
            return self._report(False, f"not saved: {error_message(exc)}")
        return self._report(True, f"saved {len(plan.layers)} layer setting(s) to {written}")

    def load(self) -> bool:
        """Restore the host's sliders from ``self.path.value``; the host is untouched on error."""
        model, _ = _host_model(self.host)
        try:
            plan, state, _ = load_configuration(self.path.value, model)
            self.host.set_plan(plan)
            if state and callable(getattr(self.host, "set_widget_state", None)):
                self.host.set_widget_state(state)
        except Exception as exc:  # noqa: BLE001 - a message in the widget, never a traceback
            return self._report(False, f"not loaded: {error_message(exc)}")
        return self._report(True, f"loaded {len(plan.layers)} layer setting(s) from {self.path.value}")
