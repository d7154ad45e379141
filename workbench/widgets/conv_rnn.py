"""Rank explorers for a conv layer (Tucker-2) and for a GRU/LSTM (per-gate ranks).

Both follow the explorer contract (`workbench.widgets.explorer.Explorer`): a slider move ->
settings -> `Plan` (`plan_for`) -> `workbench.engine.Engine` (the layer's ``tucker`` /
``svd_rnn`` module is built once per choice and memoised; the forward runs from that layer's
stage on) -> accuracy, parameters, FLOPs (`compute`, off the UI thread through the coalescer) ->
the table and the artists (`render`). CPU latency is measured only when asked: the "measure
latency" button (``measure_latency()``) times the built model, ``latency_repeats`` runs after 2
warm-up runs, off the UI thread too, and remembers the figure per plan. Errors (a rank above a
mode's size, an unsupported layer) are shown on the error line, never as a traceback.
"""
from __future__ import annotations

import ipywidgets as widgets
import torch
from torch import nn

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.layers.recurrent import GATES, check_rnn, gate_matrices, max_rank
from workbench.measure import latency_ms
from workbench.plan import LayerPlan, Plan
from workbench.plotting.gates import draw_gate_spectra, update_rank_markers
from workbench.widgets.explorer import Explorer
from workbench.widgets.persistence import check_plan_shape, check_slider_value

ROWS = (("accuracy", "metric", "{:.3f}"), ("parameters", "params", "{:,}"), ("FLOPs", "flops", "{:,}"),
        ("latency (ms, CPU, batch 1)", "latency_ms", "{:.3f}"))


def measures_table(before: dict, after: dict) -> str:
    """HTML table original / compressed / ratio of `ROWS`; a latency not measured yet shows "—"."""
    def row(key: str, fmt: str) -> list[str]:
        a, b = before[key], after[key]
        ratio = "—" if a is None or b is None else f"{b / a:.0%}"
        return ["—" if v is None else fmt.format(v) for v in (a, b)] + [ratio]

    cells = "".join(f"<tr><td>{label}</td>" + "".join(f"<td>{c}</td>" for c in row(key, fmt)) + "</tr>"
                    for label, key, fmt in ROWS)
    hint = ("" if after["latency_ms"] is not None else
            "<tr><td colspan='4'><i>latency: press “measure latency”</i></td></tr>")
    return f"<table><tr><th></th><th>original</th><th>compressed</th><th>ratio</th></tr>{cells}{hint}</table>"


class _RankExplorer(Explorer):
    """What the two explorers share: engine, before/after measures, the table, latency on demand."""

    def __init__(self, task, engine: Engine | None, synchronous: bool, latency_repeats: int,
                 figsize: tuple[float, float] | None = None):
        if isinstance(latency_repeats, bool) or not isinstance(latency_repeats, int) or latency_repeats < 1:
            raise WorkbenchError(f"latency_repeats={latency_repeats!r} must be a positive integer")
        super().__init__(task, engine or Engine(task, preview=False), synchronous, figsize)
        self.latency_repeats = latency_repeats
        base = self.engine.base
        self.before = {"metric": base["metric"], "params": base["params"], "flops": base["flops"], "latency_ms": None}
        self._latency: dict[Plan, float] = {}
        self.readout = widgets.HTML()
        self.latency_button = widgets.Button(description="measure latency",
                                             tooltip=f"median of {latency_repeats} CPU runs, batch 1")
        self.latency_button.on_click(lambda _: self.measure_latency())

    def _finish(self, controls: dict[str, widgets.Widget]) -> None:
        """Lay out ``controls`` (``{setting: widget}``) above the table, watch them, show the start."""
        self.controls.update(controls)
        self.compose([*controls.values(), self.readout, self.latency_button])
        self.watch()
        self.refresh()

    @property
    def after(self) -> dict | None:
        """Measures of the plan shown: ``{"metric", "params", "flops", "latency_ms"}`` (latency None
        until measured)."""
        return self.state.get("after")

    def measure_latency(self) -> None:
        """Time the original and the shown plan's model (off the UI thread unless synchronous)."""
        self.request(latency=True)

    def _latency_of(self, plan: Plan) -> float:
        if plan not in self._latency:  # a built copy: the task's model is not even put in eval mode
            self._latency[plan] = latency_ms(self.engine.build(plan), self.task.example_input,
                                             repeats=self.latency_repeats, warmup=2)
        return self._latency[plan]

    def compute(self, settings: dict) -> dict:
        """``{"settings", "plan", "after", "before_latency"}``: the `Engine`'s measures of the plan
        (memoised per plan); latencies only for ``settings["latency"]`` or measured before."""
        plan = self.plan_for(settings)
        result = self.evaluate(plan)
        if settings.get("latency"):
            self._latency_of(Plan())
            self._latency_of(plan)
        after = {"metric": result["metric"], "params": result["params"], "flops": result["flops"],
                 "latency_ms": self._latency.get(plan)}
        return {"settings": {k: v for k, v in settings.items() if k != "latency"}, "plan": plan, "after": after,
                "before_latency": self._latency.get(Plan())}

    def render(self, state: dict) -> None:
        self.before["latency_ms"] = state["before_latency"]
        self.readout.value = measures_table(self.before, state["after"])


class TuckerExplorer(_RankExplorer):
    """Sliders ``rank_out`` and ``rank_in`` for one Conv2d of ``task.model``.

    ``latency_repeats``: runs timed by "measure latency"; ``engine``: the `Engine` to evaluate
    plans with (default: a new one on ``task``); ``synchronous``: compute in the caller's thread.
    """

    config_path = "tucker-configuration.json"

    def __init__(self, task, layer: str, rank_out: int | None = None, rank_in: int | None = None,
                 latency_repeats: int = 10, synchronous: bool = False, engine: Engine | None = None):
        conv = task.model.get_submodule(layer)
        if not isinstance(conv, nn.Conv2d):
            raise WorkbenchError(f"layer {layer!r} is a {type(conv).__name__}; the Tucker explorer needs a Conv2d")
        super().__init__(task, engine, synchronous, latency_repeats)
        self.layer = layer
        out, inp = conv.out_channels, conv.in_channels
        self.rank_out = widgets.IntSlider(rank_out or max(1, out // 2), min=1, max=out, description="rank out")
        self.rank_in = widgets.IntSlider(rank_in or max(1, inp // 2), min=1, max=inp, description="rank in")
        self._finish({"rank_out": self.rank_out, "rank_in": self.rank_in})

    def plan_for(self, settings: dict) -> Plan:
        return Plan({self.layer: LayerPlan("tucker", {"rank_out": settings["rank_out"],
                                                      "rank_in": settings["rank_in"]})})

    def settings_for(self, plan: Plan) -> dict:
        settings = check_plan_shape(plan, "Tucker explorer", [self.layer], "tucker", ("rank_out", "rank_in"))
        if self.layer not in settings:
            raise WorkbenchError(f"the Tucker explorer always decomposes {self.layer!r}; the plan leaves it dense")
        params = settings[self.layer]
        return {key: check_slider_value(self.controls[key], params.get(key), key) for key in ("rank_out", "rank_in")}


class GateRankExplorer(_RankExplorer):
    """Sliders ``rank_ih`` / ``rank_hh`` (0 = keep dense) and a per-gate switch for one GRU/LSTM,
    above the spectra of each gate's input and hidden matrices (rank markers blitted)."""

    config_path = "gate-rank-configuration.json"

    def __init__(self, task, layer: str = "rnn", rank_ih: int = 0, rank_hh: int = 0, per_gate: bool = True,
                 latency_repeats: int = 10, synchronous: bool = False, engine: Engine | None = None):
        rnn = task.model.get_submodule(layer)
        kind = check_rnn(rnn, layer)
        super().__init__(task, engine, synchronous, latency_repeats, figsize=(8, 3))
        self.layer = layer
        limits = {side: max_rank(kind, side, rnn.input_size, rnn.hidden_size, False) for side in ("ih", "hh")}
        self.rank_ih = widgets.IntSlider(rank_ih, min=0, max=limits["ih"], description="rank ih")
        self.rank_hh = widgets.IntSlider(rank_hh, min=0, max=limits["hh"], description="rank hh")
        self.per_gate = widgets.Checkbox(per_gate, description="per gate (else stacked)")
        axes = self.view.figure.subplots(1, 2)
        spectra = {side: {gate: torch.linalg.svdvals(w.double()).numpy()
                          for gate, w in mats.items()} for side, mats in gate_matrices(rnn).items()}
        self.gates = GATES[kind]
        self.markers = draw_gate_spectra(axes, spectra, {"ih": rank_ih or None, "hh": rank_hh or None})
        self.view.figure.tight_layout()
        self._finish({"rank_ih": self.rank_ih, "rank_hh": self.rank_hh, "per_gate": self.per_gate})

    def ranks(self, settings: dict | None = None) -> dict:
        """``{"ih", "hh"}`` ranks of ``settings`` (default: the sliders'; None: that matrix stays dense)."""
        settings = self.settings() if settings is None else settings
        return {"ih": settings["rank_ih"] or None, "hh": settings["rank_hh"] or None}

    def plan_for(self, settings: dict) -> Plan:
        ranks = self.ranks(settings)
        if ranks["ih"] is None and ranks["hh"] is None:
            return Plan()
        return Plan({self.layer: LayerPlan("svd_rnn", {"rank_ih": ranks["ih"], "rank_hh": ranks["hh"],
                                                       "per_gate": settings["per_gate"]})})

    def settings_for(self, plan: Plan) -> dict:
        settings = check_plan_shape(plan, "gate rank explorer", [self.layer], "svd_rnn",
                                    ("rank_ih", "rank_hh", "per_gate"))
        params = settings.get(self.layer, {})
        values = {key: check_slider_value(self.controls[key], params.get(key) or 0, key)
                  for key in ("rank_ih", "rank_hh")}
        per_gate = params.get("per_gate", True) if params else self.per_gate.value
        if not isinstance(per_gate, bool):
            raise WorkbenchError(f"per_gate={per_gate!r} must be true or false")
        return {**values, "per_gate": per_gate}

    def render(self, state: dict) -> None:
        super().render(state)
        update_rank_markers(self.markers, self.ranks(state["settings"]))
        self.draw(tuple(self.markers.values()))
