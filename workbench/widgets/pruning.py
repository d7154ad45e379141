"""Pruning explorer: a threshold slider over the weight histogram, per-layer sparsity as a
heatmap, accuracy and bytes updating live.

One magnitude cut ``t`` for every layer (global thresholding: keep ``|w| > t``). Compute
(`PruningExplorer.compute`: plan -> `workbench.engine.Engine` -> metric, payload bytes,
sparsities) is apart from render (`PruningExplorer.render`: updates existing artists). Slider
events go through a `workbench.widgets.throttle.Coalescer` (only the latest value is computed).
Headless tests call ``update(t)`` (synchronous) and read ``state`` and the artists.
"""
from __future__ import annotations

import ipywidgets as widgets
import numpy as np

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.plan import LayerPlan, Plan
from workbench.plotting.histograms import (draw_cut, draw_sparsity_heatmap, draw_weight_histogram,
                                           update_cut, update_sparsity_heatmap, update_weight_histogram)
from workbench.widgets.figure_view import FigureView
from workbench.widgets.persistence import SaveLoadBar, check_plan_shape, check_slider_value
from workbench.widgets.throttle import Coalescer


def threshold_plan(names: list[str], threshold: float) -> Plan:
    """Prune every named layer at ``|w| > threshold`` (threshold 0: the original model)."""
    if threshold <= 0:
        return Plan({})
    return Plan({name: LayerPlan("prune", {"threshold": float(threshold)}) for name in names})


class PruningExplorer(widgets.VBox):
    """Threshold slider + histogram with the cut + sparsity heatmap + live metric and bytes.

    Parameters
    ----------
    task : a `workbench.Task`; its model is never modified.
    threshold : initial magnitude cut.
    synchronous : compute slider moves in the caller's thread (scripts); default: a worker thread.
    """

    def __init__(self, task, threshold: float = 0.0, synchronous: bool = False):
        self.task = task
        self.engine = Engine(task, preview=False)
        self.names = [info.name for info in matrix_layers(task.model)]
        if not self.names:
            raise WorkbenchError(f"model {task.name!r} has no Linear/Conv2d layer to prune")
        self.weights = {n: task.model.get_submodule(n).weight.detach().numpy().ravel() for n in self.names}
        # largest cut that still leaves every layer a weight
        self.max_threshold = float(min(np.abs(w).max() for w in self.weights.values())) * 0.999
        self.base = {"metric": task.evaluate(), "bytes": self.engine.base["bytes"]}
        self.state: dict = {}

        self.threshold = widgets.FloatSlider(value=threshold, min=0.0, max=self.max_threshold,
                                             step=self.max_threshold / 200, readout_format=".4f",
                                             description="threshold t", continuous_update=True,
                                             style={"description_width": "initial"}, layout={"width": "480px"})
        self.layer = widgets.Dropdown(options=self.names, description="histogram of")
        self.summary = widgets.HTML()
        self.coalescer = Coalescer(self.compute, self.render, self.show_error, synchronous=synchronous)
        self.threshold.observe(lambda change: self.coalescer.submit(float(change["new"])), names="value")
        self.layer.observe(lambda change: self.show_layer(change["new"]), names="value")

        self.view = FigureView((10, 3.2))
        ax_hist, ax_heat = self.view.figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
        self.histogram = draw_weight_histogram(ax_hist, self.weights[self.names[0]], title=self.names[0])
        self.cut = draw_cut(ax_hist, threshold)
        self.heatmap = draw_sparsity_heatmap(ax_heat, self.names, [0.0] * len(self.names))
        self.view.figure.tight_layout()
        self.persistence = SaveLoadBar(self, "pruning-configuration.json")  # save / load (issue 9)
        super().__init__(children=[widgets.HBox([self.threshold, self.layer]), self.summary, self.view.widget,
                                   self.persistence])
        self.update(threshold)

    # ------------------------------------------------------------------ save / load
    @property
    def plan(self) -> Plan:
        """The plan the slider shows now (the protocol of `workbench.widgets.persistence`)."""
        return threshold_plan(self.names, float(self.threshold.value))

    def set_plan(self, plan: Plan) -> None:
        """Move the slider to ``plan`` (one "prune" threshold on every layer, or the empty plan) and
        recompute; `WorkbenchError` (slider untouched) for a plan the slider cannot show."""
        settings = check_plan_shape(plan, "pruning explorer", self.names, "prune", ("threshold",))
        threshold = 0.0
        if settings:
            thresholds = sorted({repr(p.get("threshold")) for p in settings.values()})
            dense = [name for name in self.names if name not in settings]
            if dense or len(thresholds) != 1:
                raise WorkbenchError(f"the pruning explorer shows one threshold for every layer; the plan has "
                                     f"thresholds {', '.join(thresholds)} and leaves {dense or 'no layer'} dense")
            threshold = check_slider_value(self.threshold, next(iter(settings.values())).get("threshold"),
                                           "threshold")
        if float(self.threshold.value) == float(threshold):
            self.coalescer.submit(float(threshold))  # no slider event: recompute what it shows
        else:
            self.threshold.value = float(threshold)

    def widget_state(self) -> dict:
        return {"layer": self.layer.value}

    def set_widget_state(self, state: dict) -> None:
        if state.get("layer") in self.names:
            self.layer.value = state["layer"]

    # ------------------------------------------------------------------ compute
    def compute(self, threshold: float) -> dict:
        """``{"threshold", "plan", "sparsity": {layer: fraction removed}, "metric", "bytes", "error"}``.

        ``bytes``: tensor payload of the compressed state dict (`Engine.evaluate`).
        """
        sparsity = {n: float((np.abs(w) <= threshold).mean()) if threshold > 0 else 0.0
                    for n, w in self.weights.items()}
        state = {"threshold": float(threshold), "sparsity": sparsity, "error": None,
                 "plan": threshold_plan(self.names, threshold)}
        try:
            result = self.engine.evaluate(state["plan"])
        except WorkbenchError as exc:
            return {**state, "error": str(exc), "metric": None, "bytes": None}
        return {**state, "metric": result["metric"], "bytes": result["bytes"]}

    # ------------------------------------------------------------------ render
    def render(self, state: dict) -> None:
        self.state = state
        update_cut(self.cut, state["threshold"])
        update_sparsity_heatmap(self.heatmap, [state["sparsity"][n] for n in self.names])
        if state["error"]:
            self.summary.value = f"<span style='color:#b00'>{state['error']}</span>"
        else:
            total = sum(w.size for w in self.weights.values())
            removed = sum(state["sparsity"][n] * self.weights[n].size for n in self.names) / total
            self.summary.value = (
                f"{self.task.metric_name} <b>{state['metric']:.4f}</b> (original {self.base['metric']:.4f}) · "
                f"payload bytes <b>{state['bytes']:,}</b> ({state['bytes'] / self.base['bytes']:.1%} of "
                f"{self.base['bytes']:,}) · {removed:.1%} of weights pruned")
        self.view.draw()

    def update(self, threshold: float) -> dict:
        """Compute and render the cut ``threshold`` now (synchronously); returns the new state."""
        self.render(self.compute(float(threshold)))
        return self.state

    def show_error(self, message: str) -> None:
        self.summary.value = f"<span style='color:#b00'>{message}</span>"

    def show_layer(self, name: str) -> None:
        update_weight_histogram(self.histogram, self.weights[name], title=name)
        self.view.draw()
