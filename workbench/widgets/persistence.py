""""Save this configuration" / "Load": keep what the user set across kernel restarts.

Protocol (any explorer or dashboard can embed `SaveLoadBar`)
-----------------------------------------------------------
The host widget exposes

* ``plan`` (property or trait, or a method ``plan()``): the `Plan` its sliders describe now;
* ``set_plan(plan)``: move its sliders to ``plan`` (and recompute as a slider move would);
* optionally ``task`` (a `Task`) or ``model``: used to record and check layer shapes;
* optionally ``widget_state() -> dict`` / ``set_widget_state(dict)``: extra view state
  (selected layer, toggles) that is not part of the plan.

Where files go
--------------
* In JupyterLab the bar takes a file NAME, kept in a ``configurations`` folder beside the
  notebook (the kernel's working folder): paths, ``..``, links out of the folder and
  non-``.json`` names are refused with a message.
* In a web app (Voilà, `workbench.widgets.configuration.in_app`), nothing is written on the
  server: "Save" offers a download link and "Load" takes a file the visitor uploads.

The compute half (`workbench.widgets.configuration`: ``save_configuration``,
``load_configuration``, ``parse_configuration``, ``configuration_file``) knows no widgets and is
tested alone. Loading refuses (with a message, never a traceback in the widget) a file that is
too big, not strict configuration JSON, of a newer format, or made for another model; the
host's sliders are then left as they were.
"""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from torch import nn

from workbench.errors import WorkbenchError
from workbench.plan import Plan
from workbench.widgets.configuration import (CONFIG_FOLDER, CONFIG_FORMAT_VERSION, CONFIG_KIND,  # noqa: F401
                                             DEFAULT_NAME, MAX_CONFIGURATION_BYTES, check_name,
                                             configuration_file, configuration_text, in_app,
                                             load_configuration, parse_configuration, save_configuration)
from workbench.widgets.throttle import error_message

DEFAULT_PATH = DEFAULT_NAME  # the former name of the default


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
    """A file name box, "Save this configuration" and "Load" buttons, and a status line.

    ``save()`` / ``load()`` are what the buttons (and an upload) call; they return True on success
    and put any error in ``status``, the host left as it was.

    Parameters
    ----------
    host : a widget following the protocol in the module docstring.
    name : the file name first shown (a name, not a path).
    folder : where files are kept in ``"folder"`` mode; default ``configurations`` in the working
        folder (beside the notebook), made on the first save.
    mode : ``"folder"`` (JupyterLab) or ``"browser"`` (a web app: a download link and an upload
        button, nothing written on the server); default: ``"browser"`` when `in_app()`.
    """

    def __init__(self, host: Any, name: str = DEFAULT_NAME, folder: str | os.PathLike | None = None,
                 mode: str | None = None):
        # a `plan` property is looked up on the class, not evaluated (it may raise for the current view)
        has_plan = hasattr(type(host), "plan") or hasattr(host, "plan")
        if not has_plan or not callable(getattr(host, "set_plan", None)):
            raise WorkbenchError(f"{type(host).__name__} cannot be saved: it needs a `plan` property "
                                 "and a `set_plan(plan)` method")
        mode = mode or ("browser" if in_app() else "folder")
        if mode not in ("folder", "browser"):
            raise WorkbenchError(f"mode={mode!r} must be 'folder' or 'browser'")
        self.host, self.mode = host, mode
        self.folder = Path(CONFIG_FOLDER if folder is None else folder).absolute()
        self.path = widgets.Text(value=check_name(str(name)), description="file name",
                                 layout=widgets.Layout(width="360px"))
        self.save_button = widgets.Button(description="Save this configuration", icon="save",
                                          layout=widgets.Layout(width="220px"))
        self.load_button = widgets.Button(description="Load", icon="folder-open")
        self.upload = widgets.FileUpload(accept=".json,application/json", multiple=False, description="Load")
        self.download = widgets.HTML(value="")  # browser mode: the link to the configuration just made
        self.status = widgets.HTML(value="")
        self.save_button.on_click(lambda _: self.save())
        self.load_button.on_click(lambda _: self.load())
        self.upload.observe(lambda change: self.load() if change["new"] else None, names="value")
        load = self.upload if mode == "browser" else self.load_button
        rows = [widgets.HBox([self.path, self.save_button, load]), self.download, self.status]
        super().__init__(rows if mode == "browser" else [rows[0], self.status])
        self.add_class("wb-save-load")

    def _report(self, ok: bool, text: str) -> bool:
        color = "#2a7" if ok else "#c33"
        self.status.value = f"<span style='color:{color}'>{html.escape(text, quote=False)}</span>"
        return ok

    def _shown(self, name: str) -> str:
        return f"{self.folder.name}/{name}"

    def save(self) -> bool:
        """Folder mode: write the host's plan and view state to ``folder / name``. Browser mode:
        offer them as a download link (``download``); nothing is written on the server."""
        model, model_name = _host_model(self.host)
        state = self.host.widget_state() if callable(getattr(self.host, "widget_state", None)) else None
        try:
            plan = host_plan(self.host)
            if self.mode == "browser":
                name = check_name(self.path.value)
                text = configuration_text(plan, model, model_name, state)
                href = "data:application/json;base64," + base64.b64encode(text.encode()).decode("ascii")
                self.download.value = (f"<a class='wb-config-download' download=\"{html.escape(name)}\" href=\"{href}\">"
                                       f"&#x2B07; download {html.escape(name)}</a>")
                return self._report(True, f"{len(plan.layers)} layer setting(s) ready: click the link to keep "
                                          f"{name} on your computer (nothing is kept on the server)")
            path = configuration_file(self.folder, self.path.value)
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise WorkbenchError(f"cannot make the folder {str(self.folder)!r}: {exc.strerror or exc}") from None
            save_configuration(path, plan, model, model_name, state)
        except Exception as exc:  # noqa: BLE001 - a message in the widget, never a traceback
            return self._report(False, f"not saved: {error_message(exc)}")
        return self._report(True, f"saved {len(plan.layers)} layer setting(s) to {self._shown(path.name)}")

    def load(self) -> bool:
        """Restore the host's sliders from ``folder / name`` (folder mode) or from the uploaded
        file (browser mode, which is then dropped); the host is untouched on error."""
        model, _ = _host_model(self.host)
        try:
            if self.mode == "browser":
                files = self.upload.value
                if not files:
                    raise WorkbenchError("choose a configuration file (.json) with the Load button")
                self.upload.value = ()  # drop the content; the same file can be chosen again
                name, content = str(files[0].get("name", "upload")), files[0].get("content", b"")
                size = int(files[0].get("size") or len(content))
                if size > MAX_CONFIGURATION_BYTES:
                    raise WorkbenchError(f"{name!r} is {size:,} bytes; a configuration is at most "
                                         f"{MAX_CONFIGURATION_BYTES:,} bytes")
                plan, state, _ = parse_configuration(bytes(content), model, source=name)
                where = name
            else:
                path = configuration_file(self.folder, self.path.value)
                plan, state, _ = load_configuration(path, model)
                where = self._shown(path.name)
            self.host.set_plan(plan)
            if state and callable(getattr(self.host, "set_widget_state", None)):
                self.host.set_widget_state(state)
        except Exception as exc:  # noqa: BLE001 - a message in the widget, never a traceback
            return self._report(False, f"not loaded: {error_message(exc)}")
        return self._report(True, f"loaded {len(plan.layers)} layer setting(s) from {where}")
