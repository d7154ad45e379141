"""Whole-model dashboard: one rank slider per compressible layer, live accuracy / size / FLOPs and
the accuracy-vs-size chart with the current point.

Slider -> `Knob.choice` -> `Plan` -> `workbench.engine.Engine.evaluate` (sliced cached factors,
forward from the changed stage on) -> readouts + `update_tradeoff` (``set_data``) -> one draw.
Slider events go through a `Coalescer`: while one computation runs only the latest slider values
are kept, and the display always ends on the values the sliders show. Errors are shown in the
widget as a message.

Which layers get a slider comes from `knobs_for`: every layer `workbench.inventory.matrix_layers`
lists gets an ``svd`` rank knob, every tied group offered as one (`workbench.inventory.tied_groups`:
``dec.weight = enc.weight``) ONE knob setting the same rank on all its members, and every
recurrent layer gets an ``svd_rnn`` knob when that method is registered; `register_knob_provider`
adds more kinds.

Each slider's label names its break-even rank (the largest rank whose factors store fewer weights
than the dense layer, `workbench.kernels.svd.breakeven_rank` for a matrix); dense is the right end.
A rank above break-even is still built as factors (the plan says ``svd`` at that rank; only the
``svd`` recipe leaves such a layer dense), so the size readout then says "larger than dense".

The dashboard is the pattern every explorer follows (`workbench.widgets.explorer.Explorer`); its
figure host (`workbench.widgets.figure_view.FigureImage`) blits the moving artists of the chart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import ipywidgets as widgets

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers, tied_groups
from workbench.kernels.svd import factored_params
from workbench.layers.recurrent import factored_weights, max_rank, recurrent_layers, rnn_kind, unsupported_reason
from workbench.plan import LayerPlan, Plan
from workbench.plotting.tradeoff import draw_tradeoff, update_tradeoff
from workbench.registry import methods, recipe
from workbench.widgets.explorer import Explorer
from workbench.widgets.persistence import slider_values_for_plan

REFERENCE_RATIOS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75)


# --------------------------------------------------------------------------- knobs
@dataclass(frozen=True)
class Knob:
    """A rank slider for one layer: values ``1..maximum``; ``maximum`` means "keep dense".

    ``members``: for a tied group, every layer sharing the weight (``layer`` is the first); the
    knob's choice goes to all of them (`entries`), so the group is compressed as one.
    ``dense_weights`` and ``weights(rank)``: the weights the layer stores dense and as factors at
    ``rank`` (bias not included); ``breakeven``: the largest rank storing fewer than dense (0: none).
    A rank above it is still BUILT as factors (the slider's plan says ``svd`` at that rank; only the
    ``svd`` recipe leaves such a layer dense), so that layer is larger than dense.
    """

    layer: str
    description: str
    maximum: int
    to_choice: Callable[[int], LayerPlan | None]
    preview: bool = False   # the engine can preview this layer (a matrix layer)
    members: tuple[str, ...] = ()
    dense_weights: int = 0
    weights: Callable[[int], int] | None = None

    @property
    def breakeven(self) -> int | None:
        """Largest rank whose factors store fewer weights than the dense layer (None: unknown)."""
        if self.weights is None:
            return None
        return max((r for r in range(1, self.maximum) if self.weights(r) < self.dense_weights), default=0)

    def weight_ratio(self, rank: int) -> float | None:
        """Weights stored at ``rank`` over the dense layer's (1.0 at ``maximum``: dense)."""
        if rank >= self.maximum:
            return 1.0
        return None if self.weights is None else self.weights(rank) / self.dense_weights

    @property
    def layers(self) -> tuple[str, ...]:
        """The plan entries this knob sets: ``members``, or ``(layer,)``."""
        return self.members or (self.layer,)

    def choice(self, rank: int) -> LayerPlan | None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.maximum:
            raise WorkbenchError(f"rank={rank!r} for layer {self.layer!r} must be an integer in 1..{self.maximum}")
        return None if rank == self.maximum else self.to_choice(rank)

    def entries(self, rank: int) -> dict[str, LayerPlan | None]:
        """``{layer: choice}`` for every layer this knob sets (None: that layer stays dense)."""
        return dict.fromkeys(self.layers, self.choice(rank))


def _svd_choice(rank: int) -> LayerPlan:
    return LayerPlan("svd", {"rank": rank})


def _svd_weights(shape: tuple[int, int]) -> dict:
    """`Knob` size fields of an ``(m, n)`` matrix factorized as ``(m, r) @ (r, n)``."""
    return {"dense_weights": shape[0] * shape[1], "weights": partial(factored_params, tuple(shape))}


def _matrix_knobs(model) -> list[Knob]:
    knobs = [Knob(info.name, f"{info.name} {info.shape[0]}x{info.shape[1]}", min(info.shape), _svd_choice,
                  preview=True, **_svd_weights(info.shape)) for info in matrix_layers(model)]
    knobs += [Knob(group.info.name, f"{group.label} {group.info.shape[0]}x{group.info.shape[1]}",
                   min(group.info.shape), _svd_choice, members=group.names, **_svd_weights(group.info.shape))
              for group in tied_groups(model) if group.info is not None]
    return knobs


def _rnn_weights(kind: str, n_in: int, h: int, ih: int, hh: int, rank: int | None) -> int:
    """Recurrent weights (both sides) at per-gate ``rank`` (None: dense); a side at its full rank stays dense."""
    return sum(factored_weights(kind, side, n_in, h, None if rank is None or rank >= full else rank, True)
               for side, full in (("ih", ih), ("hh", hh)))


def _recurrent_knobs(model) -> list[Knob]:
    if "svd_rnn" not in methods():
        return []
    knobs = []
    for name, rnn in recurrent_layers(model):
        if unsupported_reason(rnn):
            continue
        kind, h, n_in = rnn_kind(rnn), rnn.hidden_size, rnn.input_size
        ih, hh = max_rank(kind, "ih", n_in, h, True), max_rank(kind, "hh", n_in, h, True)

        def to_choice(r: int, ih=ih, hh=hh) -> LayerPlan:
            return LayerPlan("svd_rnn", {"rank_ih": r if r < ih else None, "rank_hh": r if r < hh else None,
                                         "per_gate": True})
        knobs.append(Knob(name, f"{name} {kind} {h} (per gate)", max(ih, hh), to_choice,
                          dense_weights=_rnn_weights(kind, n_in, h, ih, hh, None),
                          weights=partial(_rnn_weights, kind, n_in, h, ih, hh)))
    return knobs


_KNOB_PROVIDERS: list[Callable] = [_matrix_knobs, _recurrent_knobs]


def register_knob_provider(provider: Callable) -> None:
    """Add ``provider(model) -> list[Knob]`` (a new layer kind gets sliders in every dashboard)."""
    _KNOB_PROVIDERS.append(provider)


def knob_groups(model, knobs: list[Knob]) -> dict[str, list[tuple[Knob, str]]]:
    """``{group title: [(knob, slider label)]}`` in model order.

    A model may define ``layer_groups() -> {layer: (group, label)}`` (MiniLM: ``("block 3",
    "query")``); otherwise every knob is in one group, labelled by its description.
    """
    declared = getattr(model, "layer_groups", None)
    groups = declared() if callable(declared) else {}
    out: dict[str, list[tuple[Knob, str]]] = {}
    for knob in knobs:
        group, label = groups.get(knob.layer, ("", knob.description))
        out.setdefault(group, []).append((knob, label))
    return out


def slider_label(knob: Knob, label: str) -> str:
    """``label`` with the knob's break-even rank marked: ``"fc2 128x128 (break-even 63)"``."""
    if knob.breakeven is None:
        return label
    return f"{label} (break-even {knob.breakeven})" if knob.breakeven else f"{label} (no rank saves)"


def knobs_for(model) -> list[Knob]:
    """Every knob of ``model``, in module order of the layers."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    knobs = [knob for provider in _KNOB_PROVIDERS for knob in provider(model)]
    return sorted(knobs, key=lambda k: order.get(k.layer, len(order)))


# --------------------------------------------------------------------------- dashboard
def direction_note(task) -> str:
    """Which way the task's metric improves, for labels: ``"higher is better"`` (accuracy,
    fidelity) or ``"lower is better"`` (a perplexity, a loss); see ``task.higher_is_better``."""
    return "higher is better" if getattr(task, "higher_is_better", True) else "lower is better"


def _readout(css: str) -> widgets.HTML:
    label = widgets.HTML()
    label.add_class("wb-readout")
    label.add_class(css)
    return label


class Dashboard(Explorer):
    """Rank sliders for every compressible layer with live metric, params, bytes, FLOPs and plot.

    The metric readout and the chart's axis say which way the metric improves (`direction_note`:
    a perplexity is lower-is-better).

    Parameters
    ----------
    task : a `workbench.Task`; its model is never modified.
    engine : an `Engine` for ``task`` (default: a new one, on the task's ``live_subset``).
    synchronous : compute in the caller's thread (tests, benchmarks) instead of a worker thread.
    reference : draw the "same ratio in every layer" curve (a few evaluations at start).
    """

    def __init__(self, task, engine: Engine | None = None, synchronous: bool = False, reference: bool = True):
        super().__init__(task, engine or Engine(task, subset=task.live_subset), synchronous,
                         figsize=(6.0, 3.6), dpi=80)
        self.knobs = knobs_for(task.model)
        if not self.knobs:
            raise WorkbenchError(f"model {task.name!r} has no layer with a rank to choose")
        self._knobs = {knob.layer: knob for knob in self.knobs}
        self.base = {"metric": task.evaluate(), **self.engine.base}
        self.history: list[tuple[float, float]] = []

        groups = knob_groups(task.model, self.knobs)
        for knob, label in (entry for members in groups.values() for entry in members):
            slider = widgets.IntSlider(value=knob.maximum, min=1, max=knob.maximum, step=1,
                                       description=slider_label(knob, label), continuous_update=True,
                                       style={"description_width": "230px"}, layout={"width": "590px"})
            slider.add_class("wb-rank-slider")
            self.controls[knob.layer] = slider
        self.sliders = self.controls  # {layer: slider}
        if len(groups) > 1:  # e.g. MiniLM: one fold per encoder block, sliders labelled by type
            slider_box = widgets.Accordion(
                children=[widgets.VBox([self.sliders[k.layer] for k, _ in members]) for members in groups.values()],
                titles=tuple(groups), selected_index=0)
        else:
            slider_box = widgets.VBox(list(self.sliders.values()))
        self.readouts = {key: _readout(f"wb-readout-{key}")
                         for key in ("accuracy", "size", "params", "bytes", "flops", "preview")}
        self.error.add_class("wb-dashboard-error")

        self.view.widget.add_class("wb-dashboard-plot")
        ax = self.view.figure.subplots()
        ref_size, ref_metric = self._reference() if reference else ([], [])
        self.tradeoff = draw_tradeoff(ax, ref_size, ref_metric, (self.base["bytes"] / 1024, self.base["metric"]),
                                      size_label="estimated size (KiB)",
                                      metric_label=f"{task.metric_name} ({direction_note(task)})")
        self.view.figure.tight_layout()

        readouts = widgets.VBox(list(self.readouts.values()), layout={"min_width": "300px"})
        self.compose([widgets.HBox([slider_box, readouts])])
        self.add_class("wb-dashboard")
        self.watch()
        self.refresh()

    # ------------------------------------------------------------------ state
    def ranks(self) -> dict[str, int]:
        """The rank each slider shows now (the dashboard's settings)."""
        return self.settings()

    def plan_for(self, ranks: dict[str, int]) -> Plan:
        """The plan the sliders describe (a slider at its maximum leaves its layer dense; a tied
        group's slider sets every member)."""
        return Plan({name: choice for layer, rank in ranks.items()
                     for name, choice in self._knobs[layer].entries(rank).items() if choice is not None})

    def settings_for(self, plan: Plan) -> dict[str, int]:
        """The slider values showing ``plan``; `WorkbenchError` if the sliders cannot show it."""
        return slider_values_for_plan(self.knobs, plan)

    def larger_than_dense(self, ranks: dict[str, int]) -> dict[str, float]:
        """``{layer: stored weights / dense weights}`` for every knob whose rank is above its
        break-even: the engine builds that layer as factors (``svd`` at the slider's rank), larger
        than the dense layer it replaces (the ``svd`` recipe would have left it dense)."""
        out = {}
        for layer, rank in ranks.items():
            knob = self._knobs[layer]
            if knob.breakeven is not None and knob.breakeven < rank < knob.maximum:
                out[layer] = knob.weight_ratio(rank)
        return out

    def larger_note(self, ranks: dict[str, int]) -> str:
        """The size readout's warning line ("" when every factorized layer saves weights)."""
        larger = self.larger_than_dense(ranks)
        if not larger:
            return ""
        parts = ", ".join(f"{layer} rank {ranks[layer]} &gt; break-even {self._knobs[layer].breakeven}: "
                          f"{ratio:.0%} of its dense weights" for layer, ratio in larger.items())
        verdict = "larger than dense" if max(larger.values()) > 1 else "as large as dense"
        return (f"<br><span class='wb-larger-than-dense' style='color:#b00'>&#9888; <b>{verdict}</b>: "
                f"{parts}. Built as factors all the same (the <code>svd</code> recipe would keep "
                f"{'this layer' if len(larger) == 1 else 'these layers'} dense); "
                "move right to the end for dense.</span>")

    # ------------------------------------------------------------------ compute
    def compute(self, ranks: dict[str, int]) -> dict:
        """``{"ranks", "plan", "result"}`` where ``result`` is `Engine.evaluate` of the plan."""
        plan = self.plan_for(ranks)
        return {"ranks": dict(ranks), "plan": plan, "result": self.engine.evaluate(plan)}

    def preview(self, layer: str, rank: int) -> dict | None:
        """The engine's instant preview (no forward pass) of one layer's rank, if it has one."""
        knob = self._knobs[layer]
        if not knob.preview or rank >= knob.maximum:
            return None
        return self.engine.preview(layer, rank)

    # ------------------------------------------------------------------ render
    def render(self, state: dict) -> None:
        """Update readouts and the chart's artists for ``state``; one draw."""
        result, base = state["result"], self.base
        self.state = state
        self.error.value = ""
        self.readouts["accuracy"].value = (f"{self.task.metric_name} <b>{result['metric']:.4f}</b> "
                                           f"(original {base['metric']:.4f}; {direction_note(self.task)})")
        self.readouts["size"].value = (f"total size <b>{result['bytes'] / 1024:,.1f} KiB</b> "
                                       f"= {result['bytes'] / base['bytes']:.1%} of {base['bytes'] / 1024:,.1f} KiB"
                                       + self.larger_note(state["ranks"]))
        self.readouts["params"].value = f"params <b>{result['params']:,}</b> ({result['params'] / base['params']:.1%})"
        self.readouts["bytes"].value = (f"bytes <b>{result['bytes']:,}</b> "
                                        "<span title='sum of numel*element_size of the state dict; "
                                        "file overhead not included'>(tensor payload)</span>")
        self.readouts["flops"].value = f"FLOPs <b>{result['flops']:,}</b> per sample ({result['flops'] / base['flops']:.1%})"
        point = (result["bytes"] / 1024, result["metric"])
        self.history.append(point)
        self.history = self.history[-200:]
        if update_tradeoff(self.tradeoff, point, trail=tuple(zip(*self.history)),
                           text=f"{result['metric']:.3f} at {point[0]:,.1f} KiB"):
            self.view.invalidate()
        self.draw(self.tradeoff.moving)

    # ------------------------------------------------------------------ events
    def changed(self, layer: str, rank: int) -> None:
        """A slider moved: the instant preview now, the full evaluation through the coalescer."""
        knob = self._knobs[layer]
        try:
            preview = self.preview(layer, rank)
        except WorkbenchError as exc:
            self.show_error(str(exc))
            return
        self.readouts["preview"].value = (
            f"<i>{knob.layer} rank {rank}: weight error {preview['weight_error']:.1%}, "
            f"output error {preview['output_error']:.1%} (instant preview)</i>" if preview else
            f"<i>{' + '.join(knob.layers)} rank {rank}</i>")
        self.request()

    def set_rank(self, layer: str, rank: int, wait: bool = True) -> dict:
        """Move one slider as a user would; with ``wait``, return once the display shows it."""
        if layer not in self.sliders:
            raise WorkbenchError(f"unknown layer {layer!r}; sliders: {', '.join(self.sliders)}")
        self.sliders[layer].value = rank
        return self.wait() if wait else self.state

    def _reference(self) -> tuple[list[float], list[float]]:
        """Size (KiB) and metric of the ``svd`` recipe at a few kept ratios, for context."""
        svd = recipe("svd")
        sizes, metrics = [], []
        for ratio in REFERENCE_RATIOS:
            try:
                result = self.engine.evaluate(svd(self.task.model, ratio=ratio))
            except WorkbenchError:
                continue
            sizes.append(result["bytes"] / 1024)
            metrics.append(result["metric"])
        sizes.append(self.base["bytes"] / 1024)
        metrics.append(self.base["metric"])
        return sizes, metrics


def timed_render(dashboard: Dashboard, state: dict) -> float:
    """Milliseconds to render ``state``: artists updated and drawn on the Agg canvas (blitted over the
    kept background in the Image view, plus its PNG encoding; a full draw under ipympl)."""
    start = time.perf_counter()
    dashboard.render(state)
    if dashboard.view.interactive:
        dashboard.view.figure.canvas.draw()
    return (time.perf_counter() - start) * 1e3
