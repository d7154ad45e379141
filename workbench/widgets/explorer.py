"""`Explorer`: the contract every live explorer (dashboard, pruning, quantization, Tucker, gate
ranks, recovery, MiniLM) follows, written once.

A control move goes one way::

    control change -> settings() (a snapshot of the controls, on the UI thread)
        -> Coalescer.submit(settings) -> compute(settings) -> result   (worker thread; no widgets)
        -> render(result): readouts and artists updated, one draw       (same worker thread)

* ``controls``: ``{setting: widget}``; ``settings()`` reads their values. ``watch(*keys)`` makes a
  change of those controls call ``changed(key, value)``, which by default asks for a new result.
* ``plan_for(settings) -> Plan`` (raises `WorkbenchError` for a value it cannot turn into a plan);
  ``plan`` (property) is the plan the controls show now. ``set_plan(plan)`` moves the controls to
  ``plan`` (``settings_for(plan)`` checks every value first, so a plan they cannot show changes
  nothing) and recomputes once: the save/load protocol of `workbench.widgets.persistence`.
* ``compute(settings) -> result`` uses the `Plan` and the `workbench.engine.Engine` (``evaluate``
  memoises results per plan); ``render(result)`` only updates what exists. ``state`` is the last
  result shown.
* Errors: an exception in ``compute`` or ``render`` becomes one line in ``error`` (never a
  traceback); the controls, ``plan`` and ``state`` stay as they were.
* ``view``: the figure host (`workbench.widgets.figure_view.FigureImage`), if the explorer draws;
  displayed, the explorer's output also carries that figure as ``image/png`` for static readers
  (`workbench.widgets.figure_view.StaticFigure`).
* ``synchronous=True`` computes in the caller's thread (tests, scripts); ``request(**changes)``
  asks for the controls' settings with some values replaced (without moving the controls) and
  ``wait()`` returns ``state`` once everything asked for is shown.
"""
from __future__ import annotations

import html
from collections import OrderedDict
from typing import Any, Sequence

import ipywidgets as widgets

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.plan import Plan
from workbench.widgets.figure_view import FigureImage, StaticFigure
from workbench.widgets.persistence import SaveLoadBar
from workbench.widgets.throttle import Coalescer

_MEMO_SIZE = 256


class Explorer(StaticFigure, widgets.VBox):
    """Base class of the explorers; see the module docstring for the contract.

    Parameters
    ----------
    task : a `workbench.Task`; its model is never modified.
    engine : the `Engine` evaluating plans (None for an explorer that does not evaluate plans).
    synchronous : compute in the caller's thread instead of a worker thread.
    figsize, dpi : size of the figure host ``view`` (None: no figure).
    """

    config_path = "workbench-configuration.json"  # default file of the save / load bar

    def __init__(self, task, engine: Engine | None = None, synchronous: bool = False,
                 figsize: tuple[float, float] | None = None, dpi: int = 100):
        self.task = task
        self.engine = engine
        self.state: dict = {}
        self.controls: dict[str, widgets.Widget] = {}
        self.error = widgets.HTML(value="")
        self.error.add_class("wb-explorer-error")
        self.view = FigureImage(figsize, dpi) if figsize is not None else None
        self.coalescer = Coalescer(self.compute, self._show, self.show_error, synchronous=synchronous)
        self._holding = False
        self._results: OrderedDict[Plan, dict] = OrderedDict()
        super().__init__()
        self.add_class("wb-explorer")

    # ------------------------------------------------------------------ to implement
    def plan_for(self, settings: dict) -> Plan:
        """The plan ``settings`` describe; `WorkbenchError` for a value that gives none."""
        raise NotImplementedError

    def settings_for(self, plan: Plan) -> dict:
        """``{setting: value}`` of the controls showing ``plan``; `WorkbenchError` if they cannot."""
        raise NotImplementedError

    def compute(self, settings: dict) -> dict:
        """The result for ``settings`` (runs on the worker thread: reads no widget)."""
        raise NotImplementedError

    def render(self, result: dict) -> None:
        """Update readouts and artists for ``result`` and draw once."""
        raise NotImplementedError

    # ------------------------------------------------------------------ layout and events
    def compose(self, rows: Sequence[widgets.Widget], below_figure: Sequence[widgets.Widget] = ()) -> None:
        """Lay out ``rows``, the error line, the figure, ``below_figure`` and the save/load bar (last)."""
        self.persistence = SaveLoadBar(self, self.config_path)  # "Save this configuration" / "Load"
        figure = [self.view.widget] if self.view is not None else []
        self.children = [*rows, self.error, *figure, *below_figure, self.persistence]

    def watch(self, *keys: str) -> None:
        """Call ``changed(key, value)`` when one of these controls (default: all) changes."""
        for key in keys or tuple(self.controls):
            self.controls[key].observe(lambda change, k=key: self._on_change(k, change["new"]), names="value")

    def _on_change(self, key: str, value: Any) -> None:
        if not self._holding:  # set_settings moves several controls, then asks once
            self.changed(key, value)

    def changed(self, key: str, value: Any) -> None:
        """A watched control moved: ask for the result of what the controls show."""
        self.request()

    # ------------------------------------------------------------------ settings and plans
    def settings(self) -> dict:
        """What the controls show now: ``{setting: value}``."""
        return {key: control.value for key, control in self.controls.items()}

    @property
    def plan(self) -> Plan:
        """The plan the controls show now."""
        return self.plan_for(self.settings())

    def set_plan(self, plan: Plan) -> None:
        """Move the controls to ``plan`` and recompute once; `WorkbenchError` (controls untouched)
        for a plan they cannot show."""
        if not isinstance(plan, Plan):
            raise WorkbenchError(f"set_plan needs a workbench.Plan, got {type(plan).__name__}")
        self.set_settings(self.settings_for(plan))

    def set_settings(self, settings: dict) -> None:
        """Move the named controls to ``settings`` (values already checked, as `settings_for`
        checks them), then ask for one result."""
        unknown = [key for key in settings if key not in self.controls]
        if unknown:
            raise WorkbenchError(f"unknown settings {unknown}; this explorer has {', '.join(self.controls)}")
        self._holding = True
        try:
            for key, value in settings.items():
                self.controls[key].value = value
        finally:
            self._holding = False
        self.request()

    # ------------------------------------------------------------------ compute and show
    def request(self, **changes: Any) -> None:
        """Compute and show the controls' settings, with ``changes`` replacing some of them (the
        controls do not move); coalesced, on the worker thread unless ``synchronous``."""
        self.coalescer.submit({**self.settings(), **changes})

    def refresh(self) -> None:
        """Compute and show the controls' settings now, in the caller's thread (first display)."""
        self.coalescer.run(self.settings())

    def wait(self, timeout: float | None = None) -> dict:
        """Block until every request is shown (`WorkbenchError` after ``timeout`` seconds, if
        given); returns ``state``."""
        if not self.coalescer.wait(timeout):
            raise WorkbenchError(f"{type(self).__name__} is still computing after {timeout} s")
        return self.state

    def evaluate(self, plan: Plan) -> dict:
        """`Engine.evaluate` of ``plan``, memoised (moving a control back costs nothing)."""
        hit = self._results.get(plan)
        if hit is None:
            hit = self._results[plan] = self.engine.evaluate(plan)
            while len(self._results) > _MEMO_SIZE:
                self._results.popitem(last=False)
        else:
            self._results.move_to_end(plan)
        return hit

    def _show(self, result: dict) -> None:
        self.render(result)
        self.state = result
        self.error.value = ""

    def show_error(self, message: str) -> None:
        """Show ``message`` on the error line (cleared by the next result shown)."""
        self.error.value = f"<span style='color:#b00'>&#9888; {html.escape(message, quote=False)}</span>"

    def draw(self, moving: Sequence = ()) -> None:
        """Show the figure's changes (``moving``: the only artists that changed, blitted)."""
        if self.view is not None:
            self.view.draw(moving)
