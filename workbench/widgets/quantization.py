"""Quantization explorer: a bit-width slider, the quantization grid drawn over the weight
histogram for uniform (symmetric, per tensor) and k-means side by side, accuracy and bytes live.

Compute (`QuantizationExplorer.compute` through `workbench.engine.Engine`, cached per bit width:
moving back is instant) is apart from render (`render`, which updates existing artists). Slider
events go through a `workbench.widgets.throttle.Coalescer`; headless tests call ``update(bits)``.
"""
from __future__ import annotations

import ipywidgets as widgets

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.kernels import quant as quant_kernels
from workbench.plan import LayerPlan, Plan
from workbench.plotting.histograms import draw_grid, draw_weight_histogram, update_grid, update_weight_histogram
from workbench.widgets.figure_view import FigureView
from workbench.widgets.persistence import SaveLoadBar, check_plan_shape, check_slider_value
from workbench.widgets.throttle import Coalescer

SCHEMES = ("uniform", "kmeans")
#: parameters of a "quant" plan that this explorer applies implicitly (a plan may spell them out)
IMPLICIT = {"per_channel": False, "asymmetric": False, "seed": 0}


class QuantizationExplorer(widgets.VBox):
    """Bits slider (1..8) + two histograms with their grids + live metric and bytes per scheme.

    ``scheme`` (toggle) picks which of the two "Save this configuration" keeps as the plan.
    """

    def __init__(self, task, bits: int = 4, synchronous: bool = False):
        quant_kernels.check_bits(bits)
        self.task = task
        self.engine = Engine(task, preview=False)
        self.names = [info.name for info in matrix_layers(task.model)]
        if not self.names:
            raise WorkbenchError(f"model {task.name!r} has no Linear/Conv2d layer to quantize")
        self.base = {"metric": task.evaluate(), "bytes": self.engine.base["bytes"]}
        self.state: dict = {}
        self._cache: dict[int, dict] = {}

        self.bits = widgets.IntSlider(value=bits, min=1, max=8, description="bits", continuous_update=False)
        self.layer = widgets.Dropdown(options=self.names, description="layer")
        self.scheme = widgets.ToggleButtons(options=SCHEMES, value=SCHEMES[0], description="plan keeps",
                                            tooltips=["scheme saved by 'Save this configuration'"] * 2,
                                            style={"button_width": "80px"})
        self.summary = widgets.HTML()
        self.coalescer = Coalescer(self._compute_state, self._render_state, self.show_error, synchronous)
        self.bits.observe(lambda change: self.coalescer.submit(int(change["new"])), names="value")
        self.layer.observe(lambda change: self.coalescer.submit(int(self.bits.value)), names="value")

        self.view = FigureView((10, 3.2))
        axes = self.view.figure.subplots(1, 2, sharey=True)
        first = self._weights(self.names[0])
        self.histograms = {s: draw_weight_histogram(ax, first, title=s) for s, ax in zip(SCHEMES, axes)}
        self.grids = {s: draw_grid(self.histograms[s].ax, [], color="C3", label=f"{s} levels") for s in SCHEMES}
        self.view.figure.tight_layout()
        self.persistence = SaveLoadBar(self, "quantization-configuration.json")  # save / load (issue 9)
        super().__init__(children=[widgets.HBox([self.bits, self.layer]), self.summary, self.view.widget,
                                   widgets.HBox([self.scheme]), self.persistence])
        self.update(bits)

    # ------------------------------------------------------------------ save / load
    @property
    def plan(self) -> Plan:
        """Every layer at the slider's bits in the kept ``scheme`` (the protocol of
        `workbench.widgets.persistence`)."""
        return Plan({n: LayerPlan("quant", {"bits": int(self.bits.value), "scheme": self.scheme.value})
                     for n in self.names})

    def set_plan(self, plan: Plan) -> None:
        """Move the slider (and the kept scheme) to ``plan``: one "quant" setting on every layer.
        `WorkbenchError` (controls untouched) for a plan they cannot show."""
        settings = check_plan_shape(plan, "quantization explorer", self.names, "quant", ("bits", "scheme"),
                                    IMPLICIT)
        distinct = sorted({(repr(p.get("bits")), repr(p.get("scheme", "uniform"))) for p in settings.values()})
        dense = [name for name in self.names if name not in settings]
        if dense or len(distinct) != 1:
            raise WorkbenchError(f"the quantization explorer shows one bit width and scheme for every layer; the "
                                 f"plan has {distinct or 'no quantized layer'} and leaves {dense} unquantized")
        setting = next(iter(settings.values()))
        bits = check_slider_value(self.bits, setting.get("bits"), "bits")
        scheme = setting.get("scheme", "uniform")
        if scheme not in SCHEMES:
            raise WorkbenchError(f"scheme={scheme!r} is not one the quantization explorer shows ({', '.join(SCHEMES)})")
        self.scheme.value = scheme
        if int(self.bits.value) == bits:
            self.coalescer.submit(bits)  # no slider event: recompute what it shows
        else:
            self.bits.value = bits

    def widget_state(self) -> dict:
        return {"layer": self.layer.value}

    def set_widget_state(self, state: dict) -> None:
        if state.get("layer") in self.names:
            self.layer.value = state["layer"]

    def _weights(self, name: str):
        return self.task.model.get_submodule(name).weight.detach().numpy().ravel()

    # ------------------------------------------------------------------ compute
    def compute(self, bits: int) -> dict:
        """``{scheme: {"metric", "bytes", "levels": {layer: grid values}, "mse": {layer: weight MSE}}}``.

        ``bytes``: tensor payload of the compressed state dict (`Engine.evaluate`).
        """
        if bits in self._cache:
            return self._cache[bits]
        result = {}
        for scheme in SCHEMES:
            plan = Plan({n: LayerPlan("quant", {"bits": bits, "scheme": scheme}) for n in self.names})
            evaluation = self.engine.evaluate(plan)
            model = self.engine.build(plan)
            levels, mse = {}, {}
            for name in self.names:
                layer = model.get_submodule(name)
                levels[name] = layer.grid().numpy()
                mse[name] = quant_kernels.weight_mse(self.task.model.get_submodule(name).weight,
                                                     layer.dequantized_weight())
            result[scheme] = {"metric": evaluation["metric"], "bytes": evaluation["bytes"],
                              "levels": levels, "mse": mse}
        self._cache[bits] = result
        return result

    # ------------------------------------------------------------------ render
    def render(self, bits: int, layer: str, result: dict) -> None:
        values = self._weights(layer)
        rows = []
        for scheme in SCHEMES:
            update_weight_histogram(self.histograms[scheme], values,
                                    title=f"{scheme}, {bits} bits: {layer} (MSE {result[scheme]['mse'][layer]:.2e})")
            update_grid(self.grids[scheme], result[scheme]["levels"][layer])
            r = result[scheme]
            rows.append(f"<b>{scheme}</b>: {self.task.metric_name} {r['metric']:.4f}, payload bytes {r['bytes']:,} "
                        f"({r['bytes'] / self.base['bytes']:.1%})")
        self.summary.value = (" · ".join(rows) + f" · original {self.base['metric']:.4f}, "
                              f"{self.base['bytes']:,} bytes")
        self.view.draw()

    def _compute_state(self, bits: int) -> dict:
        return {"bits": int(bits), "layer": self.layer.value, **self.compute(int(bits))}

    def _render_state(self, state: dict) -> None:
        self.state = state
        self.render(state["bits"], state["layer"], state)

    def update(self, bits: int) -> dict:
        """Compute (or recall) and render ``bits`` now (synchronously); returns the new state."""
        try:
            self._render_state(self._compute_state(bits))
        except WorkbenchError as exc:
            self.show_error(str(exc))
        return self.state

    def show_error(self, message: str) -> None:
        self.summary.value = f"<span style='color:#b00'>{message}</span>"
