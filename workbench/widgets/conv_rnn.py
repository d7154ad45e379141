"""Rank explorers for a conv layer (Tucker-2) and for a GRU/LSTM (per-gate ranks).

Both follow the explorer contract (`workbench.widgets.explorer.Explorer`): a slider move ->
settings -> `Plan` (`plan_for`) -> `workbench.engine.Engine` (the layer's ``tucker`` /
``svd_rnn`` module is built once per choice and memoised; the forward runs from that layer's
stage on) -> accuracy, parameters, FLOPs (`compute`, off the UI thread through the coalescer) ->
the table and the artists (`render`). CPU latency is measured only when asked: the "measure
latency" button (``measure_latency()``) times the built model (`workbench.measure.latency_samples`
of ``latency_repeats`` runs after 3 warm-up runs, summarised by `workbench.measure.latency_spread`:
median and quartiles), off the UI thread too, and remembers the figures per plan. Errors (a rank
above a mode's size, an unsupported layer) are shown on the error line, never as a traceback.

Rank sliders follow the dashboard: the right end keeps the layer dense, and the break-even rank
(where the factors hold as many weights as the dense matrix) is drawn on the spectra and named in
the readout, which says "larger than dense" above it.
"""
from __future__ import annotations

import ipywidgets as widgets
import torch
from torch import nn

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.kernels.tensor import tucker_params, unfolding_spectrum
from workbench.layers.recurrent import GATES, check_rnn, factored_weights, gate_matrices, max_rank
from workbench.measure import latency_samples, latency_spread
from workbench.plan import LayerPlan, Plan
from workbench.plotting.gates import draw_break_even, draw_gate_spectra, update_break_even, update_rank_markers
from workbench.plotting.tucker import draw_tucker_spectra, update_tucker_ranks
from workbench.widgets.explorer import Explorer
from workbench.widgets.persistence import check_plan_shape, check_slider_value

ROWS = (("accuracy", "metric", "{:.3f}"), ("parameters", "params", "{:,}"), ("FLOPs", "flops", "{:,}"),
        ("latency (ms, CPU, batch 1; median [quartiles])", "latency_ms", "{:.3f}"))


def _spread_text(spread: dict | None) -> str:
    return "—" if spread is None else f"{spread['median_ms']:.3f} [{spread['q1_ms']:.3f}–{spread['q3_ms']:.3f}]"


def measures_table(before: dict, after: dict) -> str:
    """HTML table original / compressed / ratio of `ROWS`; a latency not measured yet shows "—".

    A latency is a number (ms) or a `workbench.measure.latency_spread` dict (shown as median [quartiles])."""
    def median(v):
        return v["median_ms"] if isinstance(v, dict) else v

    def row(key: str, fmt: str) -> list[str]:
        a, b = before[key], after[key]
        ratio = "—" if a is None or b is None else f"{median(b) / median(a):.0%}"
        return ["—" if v is None else _spread_text(v) if isinstance(v, dict) else fmt.format(v)
                for v in (a, b)] + [ratio]

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
        self._latency: dict[Plan, dict[str, float]] = {}
        self.readout = widgets.HTML()
        self.latency_button = widgets.Button(description="measure latency",
                                             tooltip=f"median of {latency_repeats} CPU runs after 3 warm-up runs, "
                                                     "batch 1")
        self.size_note = widgets.HTML()
        self.latency_button.on_click(lambda _: self.measure_latency())

    def _finish(self, controls: dict[str, widgets.Widget]) -> None:
        """Lay out ``controls`` (``{setting: widget}``) above the table, watch them, show the start."""
        self.controls.update(controls)
        self.compose([*controls.values(), self.size_note, self.readout, self.latency_button])
        self.watch()
        self.refresh()

    @property
    def after(self) -> dict | None:
        """Measures of the plan shown: ``{"metric", "params", "flops", "latency_ms"}`` (latency None
        until measured, then the median in ms; its quartiles in ``latency_spread``)."""
        return self.state.get("after")

    def measure_latency(self) -> None:
        """Time the original and the shown plan's model (off the UI thread unless synchronous)."""
        self.request(latency=True)

    def _latency_of(self, plan: Plan) -> dict:
        if plan not in self._latency:  # a built copy: the task's model is not even put in eval mode
            samples = latency_samples(self.engine.build(plan), self.task.example_input,
                                      repeats=self.latency_repeats, warmup=3)
            self._latency[plan] = latency_spread(samples)
        return self._latency[plan]

    def latency_spread(self) -> dict:
        """``{"original", "compressed"}``: the `workbench.measure.latency_spread` dicts (``{"median_ms",
        "q1_ms", "q3_ms"}``) of the plan shown (None if not measured)."""
        plan = self.state.get("plan")
        return {"original": self._latency.get(Plan()), "compressed": self._latency.get(plan)}

    def compute(self, settings: dict) -> dict:
        """``{"settings", "plan", "after", "before_latency"}``: the `Engine`'s measures of the plan
        (memoised per plan); latencies only for ``settings["latency"]`` or measured before."""
        plan = self.plan_for(settings)
        result = self.evaluate(plan)
        if settings.get("latency"):
            self._latency_of(Plan())
            self._latency_of(plan)
        spread, before = self._latency.get(plan), self._latency.get(Plan())
        after = {"metric": result["metric"], "params": result["params"], "flops": result["flops"],
                 "latency_ms": spread["median_ms"] if spread else None}
        return {"settings": {k: v for k, v in settings.items() if k != "latency"}, "plan": plan, "after": after,
                "before_latency": before["median_ms"] if before else None,
                "spreads": {"before": before, "after": spread}}

    def size_text(self, settings: dict) -> str:
        """One line on the layer's size at ``settings`` against dense (break-even rank)."""
        return ""

    def render(self, state: dict) -> None:
        self.before["latency_ms"] = state["before_latency"]
        spreads = state.get("spreads", {})
        self.readout.value = measures_table({**self.before, "latency_ms": spreads.get("before")},
                                            {**state["after"], "latency_ms": spreads.get("after")})
        self.size_note.value = self.size_text(state["settings"])


class TuckerExplorer(_RankExplorer):
    """Sliders ``rank_out`` and ``rank_in`` for one Conv2d of ``task.model``, above the spectra of
    the kernel's two channel unfoldings (`workbench.plotting.tucker`): each mode's chosen rank, its
    break-even rank at the other mode's rank, and the fraction of sigma^2 kept (blitted).

    ``latency_repeats``: runs timed by "measure latency"; ``engine``: the `Engine` to evaluate
    plans with (default: a new one on ``task``); ``synchronous``: compute in the caller's thread.
    """

    config_path = "tucker-configuration.json"

    def __init__(self, task, layer: str, rank_out: int | None = None, rank_in: int | None = None,
                 latency_repeats: int = 10, synchronous: bool = False, engine: Engine | None = None):
        conv = task.model.get_submodule(layer)
        if not isinstance(conv, nn.Conv2d):
            raise WorkbenchError(f"layer {layer!r} is a {type(conv).__name__}; the Tucker explorer needs a Conv2d")
        super().__init__(task, engine, synchronous, latency_repeats, figsize=(8, 2.8))
        self.layer = layer
        out, inp = conv.out_channels, conv.in_channels
        self.kernel_shape = tuple(conv.weight.shape)
        self.rank_out = widgets.IntSlider(rank_out or max(1, out // 2), min=1, max=out, description="rank out")
        self.rank_in = widgets.IntSlider(rank_in or max(1, inp // 2), min=1, max=inp, description="rank in")
        start = {"rank_out": self.rank_out.value, "rank_in": self.rank_in.value}
        spectra = {mode: unfolding_spectrum(conv.weight, axis).double().numpy() for mode, axis in (("out", 0), ("in", 1))}
        self.artists = draw_tucker_spectra(self.view.figure.subplots(1, 2), spectra, *self._mode_ranks(start))
        self.view.figure.tight_layout()
        self._finish({"rank_out": self.rank_out, "rank_in": self.rank_in})

    def _mode_ranks(self, settings: dict) -> tuple[dict, dict]:
        """``({"out", "in"} ranks, {"out", "in"} break-even ranks at the other mode's rank)``."""
        ranks = {"out": settings["rank_out"], "in": settings["rank_in"]}
        return ranks, {"out": self.break_even_rank_out(ranks["in"]), "in": self.break_even_rank_in(ranks["out"])}

    def plan_for(self, settings: dict) -> Plan:
        return Plan({self.layer: LayerPlan("tucker", {"rank_out": settings["rank_out"],
                                                      "rank_in": settings["rank_in"]})})

    def settings_for(self, plan: Plan) -> dict:
        settings = check_plan_shape(plan, "Tucker explorer", [self.layer], "tucker", ("rank_out", "rank_in"))
        if self.layer not in settings:
            raise WorkbenchError(f"the Tucker explorer always decomposes {self.layer!r}; the plan leaves it dense")
        params = settings[self.layer]
        return {key: check_slider_value(self.controls[key], params.get(key), key) for key in ("rank_out", "rank_in")}

    def break_even_rank_out(self, rank_in: int) -> int:
        """Largest ``rank_out`` whose Tucker-2 factors hold fewer weights than the dense kernel, at ``rank_in``."""
        out, inp, kh, kw = self.kernel_shape
        dense = out * inp * kh * kw
        return max(0, (dense - inp * rank_in - 1) // (rank_in * kh * kw + out))

    def break_even_rank_in(self, rank_out: int) -> int:
        """Largest ``rank_in`` whose Tucker-2 factors hold fewer weights than the dense kernel, at ``rank_out``."""
        out, inp, kh, kw = self.kernel_shape
        return max(0, (out * inp * kh * kw - out * rank_out - 1) // (rank_out * kh * kw + inp))

    def render(self, state: dict) -> None:
        super().render(state)
        self.draw(update_tucker_ranks(self.artists, *self._mode_ranks(state["settings"])))

    def size_text(self, settings: dict) -> str:
        out, inp, kh, kw = self.kernel_shape
        dense = out * inp * kh * kw
        kept = tucker_params(self.kernel_shape, (settings["rank_out"], settings["rank_in"]))
        limit = self.break_even_rank_out(settings["rank_in"])
        verdict = "<b>larger than dense</b>" if kept >= dense else "smaller than dense"
        bound = (f"every rank out (up to {out}) stays smaller" if limit >= out else
                 f"rank out above {limit} is larger than dense")
        return (f"{self.layer}: {kept:,} weights in the factors against {dense:,} dense ({kept / dense:.0%}): "
                f"{verdict}. Break-even at rank in {settings['rank_in']}: {bound}.")


class GateRankExplorer(_RankExplorer):
    """Sliders ``rank_ih`` / ``rank_hh`` and a per-gate switch for one GRU/LSTM, above the spectra
    of each gate's input and hidden matrices (rank markers blitted).

    A slider at its right end (the matrix's full rank) keeps that matrix dense, as in the
    dashboard; ``rank_ih`` / ``rank_hh`` of None (or 0) start there. The spectra mark the
    break-even rank (`break_even`) and the size line says "larger than dense" above it."""

    config_path = "gate-rank-configuration.json"

    def __init__(self, task, layer: str = "rnn", rank_ih: int | None = None, rank_hh: int | None = None,
                 per_gate: bool = True,
                 latency_repeats: int = 10, synchronous: bool = False, engine: Engine | None = None):
        rnn = task.model.get_submodule(layer)
        kind = check_rnn(rnn, layer)
        super().__init__(task, engine, synchronous, latency_repeats, figsize=(8, 3))
        self.layer = layer
        self.kind, self.sizes = kind, (rnn.input_size, rnn.hidden_size)
        self.limits = {side: max_rank(kind, side, rnn.input_size, rnn.hidden_size, False) for side in ("ih", "hh")}
        self.rank_ih = widgets.IntSlider(rank_ih or self.limits["ih"], min=1, max=self.limits["ih"],
                                         description="rank ih")
        self.rank_hh = widgets.IntSlider(rank_hh or self.limits["hh"], min=1, max=self.limits["hh"],
                                         description="rank hh")
        self.per_gate = widgets.Checkbox(per_gate, description="per gate (else stacked)")
        axes = self.view.figure.subplots(1, 2)
        spectra = {side: {gate: torch.linalg.svdvals(w.double()).numpy()
                          for gate, w in mats.items()} for side, mats in gate_matrices(rnn).items()}
        self.gates = GATES[kind]
        start = self.ranks({"rank_ih": self.rank_ih.value, "rank_hh": self.rank_hh.value})
        self.markers = draw_gate_spectra(axes, spectra, start)
        self.break_even_lines = draw_break_even(axes, self.break_even(per_gate))
        self.view.figure.tight_layout()
        self._finish({"rank_ih": self.rank_ih, "rank_hh": self.rank_hh, "per_gate": self.per_gate})

    def ranks(self, settings: dict | None = None) -> dict:
        """``{"ih", "hh"}`` ranks of ``settings`` (default: the sliders'; None: that matrix stays dense,
        the slider at its right end)."""
        settings = self.settings() if settings is None else settings
        ranks = {}
        for side in ("ih", "hh"):
            rank, limit = settings[f"rank_{side}"], self.limits[side]
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
                raise WorkbenchError(f"rank_{side}={rank!r} must be an integer in 1..{limit} ({limit}: dense)")
            ranks[side] = None if rank == limit else rank
        return ranks

    def break_even(self, per_gate: bool) -> dict:
        """``{"ih", "hh"}``: the largest rank whose factors hold fewer weights than the dense matrix."""
        out = {}
        for side in ("ih", "hh"):
            dense = factored_weights(self.kind, side, *self.sizes, None, per_gate)
            per_rank = factored_weights(self.kind, side, *self.sizes, 1, per_gate)
            out[side] = (dense - 1) // per_rank
        return out

    def size_text(self, settings: dict) -> str:
        limits, ranks, parts = self.break_even(settings["per_gate"]), self.ranks(settings), []
        for side in ("ih", "hh"):
            rank = ranks[side]
            state = ("dense" if rank is None else "<b>larger than dense</b>" if rank > limits[side]
                     else "smaller than dense")
            parts.append(f"W_{side}: {'dense' if rank is None else f'rank {rank} ({state})'}, "
                         f"break-even rank {limits[side]}")
        return ("; ".join(parts) + f". The right end of a slider ({self.limits['ih']} / {self.limits['hh']}) "
                "keeps that matrix dense.")

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
        values = {}
        for key in ("rank_ih", "rank_hh"):
            rank = params.get(key)
            if rank is not None and rank == self.controls[key].max:
                raise WorkbenchError(f"{key}={rank} is the full rank: a plan keeps that matrix dense with null")
            values[key] = check_slider_value(self.controls[key], rank or self.controls[key].max, key)
        per_gate = params.get("per_gate", True) if params else self.per_gate.value
        if not isinstance(per_gate, bool):
            raise WorkbenchError(f"per_gate={per_gate!r} must be true or false")
        return {**values, "per_gate": per_gate}

    def render(self, state: dict) -> None:
        super().render(state)
        update_rank_markers(self.markers, self.ranks(state["settings"]))
        update_break_even(self.break_even_lines, self.break_even(state["settings"]["per_gate"]))
        self.draw(tuple(self.markers.values()) + tuple(self.break_even_lines.values()))
