"""Rank explorers for a conv layer (Tucker-2) and for a GRU/LSTM (per-gate ranks).

Each slider move: widget values -> `Plan` (`plan_for`) -> `workbench.apply` -> measures
(`compute`) -> text and artist updates (`render`). ``compute`` knows no widgets, so tests call
``explorer.update()`` or ``explorer.compute(...)`` directly, headless. Errors (a rank above a
mode's size, an unsupported layer) are shown as a message, never a traceback.
"""
from __future__ import annotations

import ipywidgets as widgets
import torch
from torch import nn

from workbench.compress import apply
from workbench.errors import WorkbenchError
from workbench.layers.recurrent import GATES, check_rnn, gate_matrices, max_rank
from workbench.measure import count_flops, count_params, latency_ms
from workbench.plan import LayerPlan, Plan
from workbench.plotting.gates import draw_gate_spectra, update_rank_markers
from workbench.widgets.figure_view import FigureView
from workbench.widgets.persistence import SaveLoadBar, check_plan_shape, check_slider_value


def measure_quick(model: nn.Module, task, repeats: int = 10) -> dict:
    """``{"metric", "params", "flops", "latency_ms"}`` (batch 1, median of ``repeats`` runs)."""
    return {"metric": task.evaluate(model), "params": count_params(model),
            "flops": count_flops(model, task.example_input),
            "latency_ms": latency_ms(model, task.example_input, repeats=repeats, warmup=2)}


def _table(before: dict, after: dict | None, error: str | None) -> str:
    if error:
        return f"<b style='color:#b00'>{error}</b>"
    rows = [("accuracy", "metric", "{:.3f}"), ("parameters", "params", "{:,}"), ("FLOPs", "flops", "{:,}"),
            ("latency (ms, CPU, batch 1)", "latency_ms", "{:.3f}")]
    cells = "".join(f"<tr><td>{label}</td><td>{fmt.format(before[key])}</td><td>{fmt.format(after[key])}</td>"
                    f"<td>{after[key] / before[key]:.0%}</td></tr>" for label, key, fmt in rows)
    return f"<table><tr><th></th><th>original</th><th>compressed</th><th>ratio</th></tr>{cells}</table>"


class _Explorer(widgets.VBox):
    config_path = "workbench-configuration.json"  # default file of the save / load bar

    def __init__(self, task, controls: list, latency_repeats: int = 10):
        self.task = task
        self.latency_repeats = latency_repeats
        self.before = measure_quick(task.model, task, latency_repeats)
        self.after: dict | None = None
        self.error: str | None = None
        self._holding = False
        self.readout = widgets.HTML()
        for control in controls:
            control.observe(lambda _change: self.update(), names="value")
        self.persistence = SaveLoadBar(self, self.config_path)  # save / load (issue 9)
        super().__init__(controls + [self.readout] + self.extra_children() + [self.persistence])

    def extra_children(self) -> list:
        return []

    def compute(self, plan: Plan) -> dict:
        """Measures of ``apply(task.model, plan)`` (raises `WorkbenchError` on bad settings)."""
        return measure_quick(apply(self.task.model, plan), self.task, self.latency_repeats)

    def control_values(self, plan: Plan) -> list[tuple[widgets.Widget, object]]:
        """``[(control, value)]`` showing ``plan``; `WorkbenchError` if the controls cannot show it."""
        raise NotImplementedError

    def set_plan(self, plan: Plan) -> None:
        """Move the controls to ``plan`` (a saved configuration) and recompute once; `WorkbenchError`
        (controls untouched) for a plan they cannot show."""
        values = self.control_values(plan)
        self._holding = True
        try:
            for control, value in values:
                control.value = value
        finally:
            self._holding = False
        self.update()

    def update(self) -> None:
        if self._holding:  # set_plan moves several controls, then computes once
            return
        try:
            self.after, self.error = self.compute(self.plan()), None
        except WorkbenchError as exc:
            self.after, self.error = None, str(exc)
        self.render()

    def render(self) -> None:
        self.readout.value = _table(self.before, self.after, self.error)


class TuckerExplorer(_Explorer):
    """Sliders ``rank_out`` and ``rank_in`` for one Conv2d of ``task.model``."""

    config_path = "tucker-configuration.json"

    def __init__(self, task, layer: str, rank_out: int | None = None, rank_in: int | None = None,
                 latency_repeats: int = 10):
        conv = task.model.get_submodule(layer)
        if not isinstance(conv, nn.Conv2d):
            raise WorkbenchError(f"layer {layer!r} is a {type(conv).__name__}; the Tucker explorer needs a Conv2d")
        self.layer = layer
        out, inp = conv.out_channels, conv.in_channels
        self.rank_out = widgets.IntSlider(rank_out or max(1, out // 2), min=1, max=out, description="rank out")
        self.rank_in = widgets.IntSlider(rank_in or max(1, inp // 2), min=1, max=inp, description="rank in")
        super().__init__(task, [self.rank_out, self.rank_in], latency_repeats)
        self.update()

    def plan(self) -> Plan:
        return Plan({self.layer: LayerPlan("tucker", {"rank_out": self.rank_out.value,
                                                      "rank_in": self.rank_in.value})})

    def control_values(self, plan: Plan) -> list:
        settings = check_plan_shape(plan, "Tucker explorer", [self.layer], "tucker", ("rank_out", "rank_in"))
        if self.layer not in settings:
            raise WorkbenchError(f"the Tucker explorer always decomposes {self.layer!r}; the plan leaves it dense")
        params = settings[self.layer]
        return [(self.rank_out, check_slider_value(self.rank_out, params.get("rank_out"), "rank_out")),
                (self.rank_in, check_slider_value(self.rank_in, params.get("rank_in"), "rank_in"))]


class GateRankExplorer(_Explorer):
    """Sliders ``rank_ih`` / ``rank_hh`` (0 = keep dense) and a per-gate switch for one GRU/LSTM,
    above the spectra of each gate's input and hidden matrices."""

    config_path = "gate-rank-configuration.json"

    def __init__(self, task, layer: str = "rnn", rank_ih: int = 0, rank_hh: int = 0, per_gate: bool = True,
                 latency_repeats: int = 10):
        rnn = task.model.get_submodule(layer)
        kind = check_rnn(rnn, layer)
        self.layer = layer
        limits = {side: max_rank(kind, side, rnn.input_size, rnn.hidden_size, False) for side in ("ih", "hh")}
        self.rank_ih = widgets.IntSlider(rank_ih, min=0, max=limits["ih"], description="rank ih")
        self.rank_hh = widgets.IntSlider(rank_hh, min=0, max=limits["hh"], description="rank hh")
        self.per_gate = widgets.Checkbox(per_gate, description="per gate (else stacked)")
        self.view = FigureView((8, 3))
        axes = self.view.figure.subplots(1, 2)
        spectra = {side: {gate: torch.linalg.svdvals(w.double()).numpy()
                          for gate, w in mats.items()} for side, mats in gate_matrices(rnn).items()}
        self.gates = GATES[kind]
        self.markers = draw_gate_spectra(axes, spectra, self.ranks())
        self.view.figure.tight_layout()
        super().__init__(task, [self.rank_ih, self.rank_hh, self.per_gate], latency_repeats)
        self.update()

    def extra_children(self) -> list:
        return [self.view.widget]

    def ranks(self) -> dict:
        return {"ih": self.rank_ih.value or None, "hh": self.rank_hh.value or None}

    def plan(self) -> Plan:
        ranks = self.ranks()
        if ranks["ih"] is None and ranks["hh"] is None:
            return Plan()
        return Plan({self.layer: LayerPlan("svd_rnn", {"rank_ih": ranks["ih"], "rank_hh": ranks["hh"],
                                                       "per_gate": self.per_gate.value})})

    def control_values(self, plan: Plan) -> list:
        settings = check_plan_shape(plan, "gate rank explorer", [self.layer], "svd_rnn",
                                    ("rank_ih", "rank_hh", "per_gate"))
        params = settings.get(self.layer, {})
        values = [(slider, check_slider_value(slider, params.get(key) or 0, key))
                  for slider, key in ((self.rank_ih, "rank_ih"), (self.rank_hh, "rank_hh"))]
        per_gate = params.get("per_gate", True) if params else self.per_gate.value
        if not isinstance(per_gate, bool):
            raise WorkbenchError(f"per_gate={per_gate!r} must be true or false")
        return values + [(self.per_gate, per_gate)]

    def render(self) -> None:
        super().render()
        update_rank_markers(self.markers, self.ranks())
        self.view.draw()
