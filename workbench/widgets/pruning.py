"""Pruning explorer: a threshold slider over the weight histogram, per-layer sparsity as a
heatmap, accuracy and bytes updating live.

One magnitude cut ``t`` for every layer (global thresholding: keep ``|w| > t``). It follows the
explorer contract (`workbench.widgets.explorer.Explorer`): settings ``{"threshold", "layer"}`` ->
`threshold_plan` -> `workbench.engine.Engine` (memoised per plan) -> metric, payload bytes,
sparsities (`compute`) -> existing artists updated, one draw (`render`), off the UI thread.
Headless: ``update(t)`` computes and shows a cut now and returns ``state``.
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
from workbench.widgets.explorer import Explorer
from workbench.widgets.persistence import check_plan_shape, check_slider_value


def threshold_plan(names: list[str], threshold: float) -> Plan:
    """Prune every named layer at ``|w| > threshold`` (threshold 0: the original model)."""
    if threshold <= 0:
        return Plan({})
    return Plan({name: LayerPlan("prune", {"threshold": float(threshold)}) for name in names})


class PruningExplorer(Explorer):
    """Threshold slider + histogram with the cut + sparsity heatmap + live metric and bytes.

    Parameters
    ----------
    task : a `workbench.Task`; its model is never modified.
    threshold : initial magnitude cut.
    synchronous : compute slider moves in the caller's thread (scripts); default: a worker thread.
    engine : the `Engine` to evaluate plans with (default: a new one on ``task``).
    """

    config_path = "pruning-configuration.json"

    def __init__(self, task, threshold: float = 0.0, synchronous: bool = False, engine: Engine | None = None):
        super().__init__(task, engine or Engine(task, preview=False), synchronous, figsize=(10, 3.4))
        self.names = [info.name for info in matrix_layers(task.model)]
        if not self.names:
            raise WorkbenchError(f"model {task.name!r} has no Linear/Conv2d layer to prune")
        self.weights = {n: task.model.get_submodule(n).weight.detach().numpy().ravel() for n in self.names}
        # largest cut that still leaves every layer a weight
        self.max_threshold = float(min(np.abs(w).max() for w in self.weights.values())) * 0.999
        self.base = {"metric": task.evaluate(), "bytes": self.engine.base["bytes"]}

        self.threshold = widgets.FloatSlider(value=threshold, min=0.0, max=self.max_threshold,
                                             step=self.max_threshold / 200, readout_format=".4f",
                                             description="threshold t", continuous_update=True,
                                             style={"description_width": "initial"}, layout={"width": "480px"})
        self.layer = widgets.Dropdown(options=self.names, description="histogram of")
        self.summary = widgets.HTML()
        self.controls.update(threshold=self.threshold, layer=self.layer)

        ax_hist, ax_heat = self.view.figure.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
        self.histogram = draw_weight_histogram(ax_hist, self.weights[self.names[0]])
        self._histogram_of = self.names[0]
        self.cut = draw_cut(ax_hist, threshold)
        self.heatmap = draw_sparsity_heatmap(ax_heat, self.names, [0.0] * len(self.names))
        self.view.figure.tight_layout()
        self.compose([widgets.HBox([self.threshold, self.layer]), self.summary])
        self.watch()
        self.refresh()

    # ------------------------------------------------------------------ settings and plans
    def plan_for(self, settings: dict) -> Plan:
        return threshold_plan(self.names, float(settings["threshold"]))

    def settings_for(self, plan: Plan) -> dict:
        """The slider value showing ``plan`` (one "prune" threshold on every layer, or the empty
        plan); `WorkbenchError` for a plan the slider cannot show."""
        settings = check_plan_shape(plan, "pruning explorer", self.names, "prune", ("threshold",))
        if not settings:
            return {"threshold": 0.0}
        thresholds = sorted({repr(p.get("threshold")) for p in settings.values()})
        dense = [name for name in self.names if name not in settings]
        if dense or len(thresholds) != 1:
            raise WorkbenchError(f"the pruning explorer shows one threshold for every layer; the plan has "
                                 f"thresholds {', '.join(thresholds)} and leaves {dense or 'no layer'} dense")
        threshold = check_slider_value(self.threshold, next(iter(settings.values())).get("threshold"), "threshold")
        return {"threshold": float(threshold)}

    def widget_state(self) -> dict:
        return {"layer": self.layer.value}

    def set_widget_state(self, state: dict) -> None:
        if state.get("layer") in self.names:
            self.layer.value = state["layer"]

    # ------------------------------------------------------------------ compute
    def compute(self, settings: dict) -> dict:
        """``{"threshold", "layer", "plan", "sparsity": {layer: fraction removed}, "metric", "bytes"}``.

        ``bytes``: tensor payload of the compressed state dict (`Engine.evaluate`).
        """
        threshold = float(settings["threshold"])
        plan = self.plan_for(settings)
        result = self.evaluate(plan)  # raises WorkbenchError for a cut that empties a layer
        sparsity = {n: float((np.abs(w) <= threshold).mean()) if threshold > 0 else 0.0
                    for n, w in self.weights.items()}
        return {"threshold": threshold, "layer": settings["layer"], "plan": plan, "sparsity": sparsity,
                "metric": result["metric"], "bytes": result["bytes"]}

    # ------------------------------------------------------------------ render
    def render(self, state: dict) -> None:
        update_cut(self.cut, state["threshold"])
        update_sparsity_heatmap(self.heatmap, [state["sparsity"][n] for n in self.names])
        layer = state["layer"]
        if layer != self._histogram_of:
            update_weight_histogram(self.histogram, self.weights[layer])
            self._histogram_of = layer
        self.histogram.ax.set_title(f"{layer}: {state['sparsity'][layer]:.0%} of its {self.weights[layer].size:,} "
                                    f"weights inside ±t (pruned)", fontsize="medium")
        total = sum(w.size for w in self.weights.values())
        removed = sum(state["sparsity"][n] * self.weights[n].size for n in self.names) / total
        self.summary.value = (
            f"{self.task.metric_name} <b>{state['metric']:.4f}</b> (original {self.base['metric']:.4f}) · "
            f"payload bytes <b>{state['bytes']:,}</b> ({state['bytes'] / self.base['bytes']:.1%} of "
            f"{self.base['bytes']:,}) · {removed:.1%} of weights pruned")
        self.draw()

    def update(self, threshold: float) -> dict:
        """Compute and show the cut ``threshold`` now (the slider stays); returns the new state
        (unchanged, with the message on the error line, for a cut that cannot be applied)."""
        self.request(threshold=float(threshold))
        return self.wait()
