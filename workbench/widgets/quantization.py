"""Quantization explorer: a bit-width slider, the quantization grid drawn over the weight
histogram for uniform (symmetric, per tensor) and k-means side by side, accuracy and bytes live.

It follows the explorer contract (`workbench.widgets.explorer.Explorer`): settings ``{"bits",
"layer", "scheme"}`` -> one ``quant`` plan per scheme -> `workbench.engine.Engine` (cached per
bit width: moving back is instant) -> metric, bytes, grids (`compute`) -> existing artists updated
(`render`), off the UI thread. ``scheme`` only picks which of the two plans is ``plan`` (what
"Save this configuration" keeps). Headless: ``update(bits)`` shows a width now, returns ``state``.
"""
from __future__ import annotations

import ipywidgets as widgets
import torch

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.kernels import quant as quant_kernels
from workbench.plan import LayerPlan, Plan
from workbench.plotting.histograms import draw_grid, draw_weight_histogram, update_grid, update_weight_histogram
from workbench.widgets.explorer import Explorer
from workbench.widgets.persistence import check_plan_shape, check_slider_value

SCHEMES = ("uniform", "kmeans")
#: parameters of a "quant" plan that this explorer applies implicitly (a plan may spell them out)
IMPLICIT = {"per_channel": False, "asymmetric": False, "seed": 0}


class QuantizationExplorer(Explorer):
    """Bits slider (1..8) + two histograms with their grids + live metric and bytes per scheme.

    ``scheme`` (toggle) picks which of the two "Save this configuration" keeps as the plan.
    ``engine``: the `Engine` to evaluate plans with (default: a new one on ``task``).
    """

    config_path = "quantization-configuration.json"

    def __init__(self, task, bits: int = 4, synchronous: bool = False, engine: Engine | None = None):
        quant_kernels.check_bits(bits)
        super().__init__(task, engine or Engine(task, preview=False), synchronous, figsize=(10, 3.6))
        self.names = [info.name for info in matrix_layers(task.model)]
        if not self.names:
            raise WorkbenchError(f"model {task.name!r} has no Linear/Conv2d layer to quantize")
        self.base = {"metric": task.evaluate(), "bytes": self.engine.base["bytes"]}
        self._cache: dict[int, dict] = {}

        self.bits = widgets.IntSlider(value=bits, min=1, max=8, description="bits", continuous_update=False)
        self.layer = widgets.Dropdown(options=self.names, description="layer")
        self.scheme = widgets.ToggleButtons(options=SCHEMES, value=SCHEMES[0], description="plan keeps",
                                            tooltips=["scheme saved by 'Save this configuration'"] * 2,
                                            style={"button_width": "80px"})
        self.summary = widgets.HTML()
        self.controls.update(bits=self.bits, layer=self.layer, scheme=self.scheme)

        axes = self.view.figure.subplots(1, 2, sharey=True)
        first = self._weights(self.names[0])
        # two-line titles from the start, so that tight_layout leaves them room
        self.histograms = {s: draw_weight_histogram(ax, first, title=f"{s}\n") for s, ax in zip(SCHEMES, axes)}
        self.grids = {s: draw_grid(self.histograms[s].ax, [], color="C3", label=f"{s} levels in use")
                      for s in SCHEMES}
        self.view.figure.tight_layout()
        self.compose([widgets.HBox([self.bits, self.layer]), self.summary], [widgets.HBox([self.scheme])])
        self.watch("bits", "layer")  # the kept scheme changes the plan, not what is shown
        self.refresh()

    # ------------------------------------------------------------------ settings and plans
    def plan_for(self, settings: dict) -> Plan:
        """Every layer at ``bits`` in the kept ``scheme``."""
        return Plan({n: LayerPlan("quant", {"bits": int(settings["bits"]), "scheme": settings["scheme"]})
                     for n in self.names})

    def settings_for(self, plan: Plan) -> dict:
        """The slider and kept scheme showing ``plan``: one "quant" setting on every layer.
        `WorkbenchError` for a plan they cannot show."""
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
        return {"scheme": scheme, "bits": bits}

    def widget_state(self) -> dict:
        return {"layer": self.layer.value}

    def set_widget_state(self, state: dict) -> None:
        if state.get("layer") in self.names:
            self.layer.value = state["layer"]

    def _weights(self, name: str):
        return self.task.model.get_submodule(name).weight.detach().numpy().ravel()

    # ------------------------------------------------------------------ compute
    def measures(self, bits: int) -> dict:
        """``{scheme: {"metric", "bytes", "levels", "used", "busiest", "mse"}}``, computed once per bit
        width, each but ``metric`` and ``bytes`` a ``{layer: ...}``: ``levels`` the ``2^bits``
        representable values, ``used`` the values some weight takes (ascending), ``busiest`` the
        fraction of the layer's weights on its most common value, ``mse`` the weight MSE.
        ``bytes``: tensor payload of the compressed state dict."""
        quant_kernels.check_bits(bits)
        if bits in self._cache:
            return self._cache[bits]
        result = {}
        for scheme in SCHEMES:
            plan = Plan({n: LayerPlan("quant", {"bits": bits, "scheme": scheme}) for n in self.names})
            evaluation = self.evaluate(plan)
            model = self.engine.build(plan)
            levels, used, busiest, mse = {}, {}, {}, {}
            for name in self.names:
                layer = model.get_submodule(name)
                levels[name] = layer.grid().numpy()
                w_hat = layer.dequantized_weight()
                values, counts = torch.unique(w_hat, return_counts=True)
                used[name], busiest[name] = values.numpy(), float(counts.max()) / w_hat.numel()
                mse[name] = quant_kernels.weight_mse(self.task.model.get_submodule(name).weight, w_hat)
            result[scheme] = {"metric": evaluation["metric"], "bytes": evaluation["bytes"],
                              "levels": levels, "used": used, "busiest": busiest, "mse": mse}
        self._cache[bits] = result
        return result

    def compute(self, settings: dict) -> dict:
        """``{"bits", "layer", "plan", "uniform": measures, "kmeans": measures}`` (see `measures`)."""
        bits = settings["bits"]
        return {"bits": bits, "layer": settings["layer"], "plan": self.plan_for(settings), **self.measures(bits)}

    # ------------------------------------------------------------------ render
    def render(self, state: dict) -> None:
        bits, layer = state["bits"], state["layer"]
        values = self._weights(layer)
        rows = []
        for scheme in SCHEMES:
            r = state[scheme]
            update_weight_histogram(self.histograms[scheme], values,
                                    title=f"{scheme}, {bits} bits: {layer} (weight MSE {r['mse'][layer]:.2e})\n"
                                          f"{len(r['used'][layer])} of {2 ** bits} levels used; "
                                          f"{r['busiest'][layer]:.0%} of weights on the busiest")
            update_grid(self.grids[scheme], r["used"][layer], widen=True)
            rows.append(f"<b>{scheme}</b>: {self.task.metric_name} {r['metric']:.4f}, payload bytes {r['bytes']:,} "
                        f"({r['bytes'] / self.base['bytes']:.1%})")
        self.summary.value = (" · ".join(rows) + f" · original {self.base['metric']:.4f}, "
                              f"{self.base['bytes']:,} bytes")
        self.draw()

    def update(self, bits: int) -> dict:
        """Compute (or recall) and show ``bits`` now (the slider stays); returns the new state
        (unchanged, with the message on the error line, for a width that cannot be applied)."""
        self.request(bits=bits)
        return self.wait()
