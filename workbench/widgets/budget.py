"""Byte-budget explorer: one budget slider, the joint allocator re-solved on every move.

The per-layer option menu (`workbench.select.build_menu`: every option of every family with its
exact cost and predicted loss) is built ONCE. A slider move then only re-solves the
multiple-choice knapsack on that menu (`workbench.select.joint_allocate` with ``menu=``: tens of
milliseconds) and evaluates the pick through the engine (`Engine.evaluate`: metric on the task's
test data, exact state-dict payload bytes)::

    budget slider -> joint_allocate(task, budget, menu=menu, engine=engine) -> JointAllocation
        -> readouts (fraction used, bytes, metric, choices per family), per-layer table,
           the pick's marker on the fronts chart (`update_budget_pick`, blitted)

The chart's fronts (each single family and the joint allocator, `joint_fronts` over a grid of
budgets on the same menu) are drawn once. A budget below the smallest model the menu can reach
shows that size as a message; the last pick stays shown.
"""
from __future__ import annotations

import html
import math
import time
from collections import Counter, OrderedDict
from typing import Mapping, Sequence

import ipywidgets as widgets

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.plan import LayerPlan, Plan
from workbench.plotting.budget import draw_budget_fronts, update_budget_pick
from workbench.select import JointAllocation, JointMenu, build_menu, check_families, joint_allocate, joint_fronts, menu_table
from workbench.widgets.dashboard import direction_note
from workbench.widgets.explorer import Explorer

#: Budgets (fractions of the original's ``by``) at which the fronts are traced (those below the
#: smallest reachable model are dropped, and that smallest fraction is added).
FRONT_BUDGETS = (0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
SLIDER_RANGE = (0.03, 1.0, 0.005)   # min, max, step of the budget slider
_MEMO_SIZE = 256


def _readout(css: str) -> widgets.HTML:
    label = widgets.HTML()
    label.add_class("wb-readout")
    label.add_class(css)
    return label


def _pins(pinned: Mapping[str, LayerPlan | str | None] | None) -> dict[str, LayerPlan | None]:
    """``{layer: LayerPlan or None (dense)}``; `WorkbenchError` for another value."""
    pins = {}
    for name, choice in (pinned or {}).items():
        if choice is not None and choice != "dense" and not isinstance(choice, LayerPlan):
            raise WorkbenchError(f"pin {choice!r} for layer {name!r} must be a LayerPlan or 'dense'")
        pins[name] = choice if isinstance(choice, LayerPlan) else None
    return pins


def choices_table(choices: dict, by: str) -> str:
    """HTML table of ``JointAllocation.choices``: layer, family, method, settings, cost, predicted loss."""
    head = "".join(f"<th>{h}</th>" for h in ("layer", "family", "method", "settings", by, "predicted loss"))
    rows = []
    for layer, c in choices.items():
        settings = ", ".join(f"{k}={v}" for k, v in c["params"].items()) or "&ndash;"
        rows.append(f"<tr><td>{html.escape(layer)}</td><td>{html.escape(c['family'])}</td>"
                    f"<td>{html.escape(c['method'])}</td><td>{html.escape(settings)}</td>"
                    f"<td style='text-align:right'>{c['cost']:,.0f}</td>"
                    f"<td style='text-align:right'>{c['loss']:.2e}</td></tr>")
    return f"<table class='wb-budget-choices'><tr>{head}</tr>{''.join(rows)}</table>"


class BudgetExplorer(Explorer):
    """A budget slider whose every move re-solves the joint allocation and evaluates the pick.

    Parameters
    ----------
    task : a `workbench.Task`; its model is never modified.
    families : families offered (`workbench.select.FAMILIES`; None: the default set; keep it small
        for a fast menu, e.g. ``("quant", "gptq", "svd", "prune")``).
    by : "bytes" (state-dict payload), "params" or "flops"; the slider is a fraction of the
        original's ``by``.
    budget : where the slider starts.
    pinned : ``{layer: LayerPlan or "dense"}`` that every pick keeps.
    relative_to : "model" or "layers" (as `joint_allocate`).
    engine : an `Engine` on ``task`` to reuse (default: a new one, evaluating on the full test data).
    synchronous : compute in the caller's thread (tests, scripts).
    progress : a tqdm bar while the menu is built.
    front_budgets : budgets at which the fronts are traced (drawn once).
    layers : candidate layers (default: every matrix layer), e.g. MiniLM's encoder Linears.
    menu : a menu already built on ``engine`` (`workbench.select.build_menu` with these
        ``families``): the explorer then only re-solves (a large model's menu is built once, apart).
    loss : how the menu predicts each option's loss (`build_menu`): "proxy", "weighted" (the proxy
        scaled by each layer's measured sensitivity; one evaluation per layer) or "sensitivity".
    """

    def __init__(self, task, families: Sequence[str] | str | None = None, by: str = "bytes", *,
                 budget: float = 0.15, pinned: Mapping[str, LayerPlan | str | None] | None = None, relative_to: str = "model",
                 engine: Engine | None = None, synchronous: bool = False, progress: bool = True,
                 front_budgets: Sequence[float] = FRONT_BUDGETS, layers: Sequence[str] | None = None,
                 menu: JointMenu | None = None, loss: str = "proxy"):
        super().__init__(task, engine or Engine(task, preview=False, freeze_gc=False), synchronous,
                         figsize=(6.4, 3.8), dpi=80)
        self.families, self.by, self.relative_to = check_families(families), by, relative_to
        self.pinned = pins = _pins(pinned)
        if menu is not None and engine is None:
            raise WorkbenchError("a menu given to BudgetExplorer needs the engine it was built on (engine=)")
        self.menu = menu or build_menu(task, self.families, layers=layers, engine=self.engine, progress=progress,
                                       loss=loss, extra={name: [c] for name, c in pins.items() if c is not None})
        unknown = [name for name in pins if name not in self.menu.layers]
        if unknown:
            raise WorkbenchError(f"pinned layers {unknown} are not candidate layers; candidates: "
                                 f"{', '.join(self.menu.layers)}")
        table, _ = menu_table(self.menu, by, self.families, pins, relative_to)
        #: the smallest fraction of the original's ``by`` the menu can reach
        self.floor = table.smallest() / table.total
        self._picks: OrderedDict[float, JointAllocation] = OrderedDict()

        low, high, step = SLIDER_RANGE
        if not low <= budget <= high:
            raise WorkbenchError(f"budget={budget!r} must be in [{low}, {high}] (the slider's range)")
        slider = widgets.FloatSlider(value=budget, min=low, max=high, step=step, readout_format=".3f",
                                     description=f"budget ({by})", continuous_update=True,
                                     style={"description_width": "110px"}, layout={"width": "520px"})
        slider.add_class("wb-budget-slider")
        self.controls["budget"] = slider
        self.slider = slider
        self.readouts = {key: _readout(f"wb-readout-{key}")
                         for key in ("fraction", "metric", "bytes", "families", "timing")}
        self.table = widgets.HTML()
        self.table.add_class("wb-budget-table")

        budgets = sorted({math.ceil(self.floor * 1000) / 1000, *(b for b in front_budgets if b >= self.floor)})
        self.fronts = joint_fronts(task, budgets, by, self.families, relative_to=relative_to, engine=self.engine, menu=self.menu)
        ax = self.view.figure.subplots()
        self.artists = draw_budget_fronts(
            ax, {label: self.fronts.arrays(label) for label in self.fronts["fronts"]},
            baseline=self.fronts["original_metric"], xlabel=f"fraction of the original {by}",
            ylabel=f"{task.metric_name} ({direction_note(task)})")
        self.view.figure.tight_layout()
        self.view.widget.add_class("wb-budget-plot")

        note = widgets.HTML(f"<i>{len(self.menu.layers)} layers, {sum(map(len, self.menu.choices))} options "
                            f"({', '.join(self.families)}); smallest reachable: {self.floor:.3f} of the "
                            f"original {by}</i>")
        readouts = widgets.VBox(list(self.readouts.values()), layout={"min_width": "300px"})
        self.compose([widgets.VBox([slider, note]), readouts], below_figure=[self.table])
        self.add_class("wb-budget-explorer")
        self.watch()
        self.refresh()

    # ------------------------------------------------------------------ state
    def allocation(self, budget: float) -> JointAllocation:
        """`joint_allocate` at ``budget`` on the built menu (memoised per budget); `WorkbenchError`
        below the smallest reachable model."""
        key = round(float(budget), 6)
        hit = self._picks.get(key)
        if hit is None:
            hit = self._picks[key] = joint_allocate(
                self.task, key, self.by, self.families, pinned=self.pinned, relative_to=self.relative_to,
                engine=self.engine, menu=self.menu)
            while len(self._picks) > _MEMO_SIZE:
                self._picks.popitem(last=False)
        else:
            self._picks.move_to_end(key)
        return hit

    def plan_for(self, settings: dict) -> Plan:
        """The knapsack's pick at ``settings["budget"]``."""
        return self.allocation(settings["budget"]).as_plan()

    @property
    def plan(self) -> Plan:
        """The plan shown now (the last valid pick: a budget below the floor keeps it)."""
        return self.state["allocation"].as_plan() if self.state else self.plan_for(self.settings())

    def settings_for(self, plan: Plan) -> dict:
        """The slider at ``plan``'s cost (rounded up to a step); the knapsack then picks the best
        plan of that cost, which may differ from ``plan``."""
        used = self.evaluate(plan)[self.by]
        if self.relative_to == "layers":
            used -= self.menu.fixed[self.by]
        total = self.menu.total[self.by] if self.relative_to == "model" else self.menu.dense_cost(self.by)
        low, high, step = SLIDER_RANGE
        value = round(min(high, max(low, -(-used / total // step) * step)), 6)
        if used / total > high + 1e-9:
            raise WorkbenchError(f"plan uses {used / total:.3f} of the original {self.by}; the slider goes to {high}")
        return {"budget": value}

    # ------------------------------------------------------------------ compute and render
    def compute(self, settings: dict) -> dict:
        """``{"budget", "allocation", "move_ms"}``: the pick re-solved and evaluated (worker thread)."""
        start = time.perf_counter()
        allocation = self.allocation(settings["budget"])
        return {"budget": settings["budget"], "allocation": allocation,
                "move_ms": (time.perf_counter() - start) * 1e3}

    def render(self, state: dict) -> None:
        """Readouts, the choices table and the pick's marker; one (blitted) draw."""
        a = state["allocation"]
        self.readouts["fraction"].value = (f"budget {state['budget']:.3f}: uses <b>{a.fraction_used:.3f}</b> "
                                           f"of the original {a.by} ({a.used:,} of {a.total:,})")
        self.readouts["metric"].value = (f"{self.task.metric_name} <b>{a.metric:.4f}</b> "
                                         f"(original {a.original_metric:.4f}; {direction_note(self.task)})")
        self.readouts["bytes"].value = f"bytes <b>{a.bytes:,}</b> (tensor payload), params {a.params:,}"
        counts = Counter(c["family"] for c in a.choices.values())
        self.readouts["families"].value = "layers per family: " + ", ".join(
            f"{family} <b>{n}</b>" for family, n in sorted(counts.items()))
        self.readouts["timing"].value = (f"<i>solve {a.solve_ms:.0f} ms ({a.solver}); solve + evaluate "
                                         f"{state['move_ms']:.0f} ms</i>")
        self.table.value = choices_table(a.choices, a.by)
        if update_budget_pick(self.artists, a.fraction_used, a.metric):
            self.view.invalidate()
        self.draw([self.artists["pick"]])

    def show_error(self, message: str) -> None:
        """The message, and which pick stays shown."""
        if self.state:
            message += f" (still showing the pick for budget={self.state['budget']:.3f})"
        super().show_error(message)

    def set_budget(self, budget: float, wait: bool = True) -> dict:
        """Move the slider as a user would; with ``wait``, return once the display shows it."""
        self.slider.value = budget
        return self.wait() if wait else self.state
