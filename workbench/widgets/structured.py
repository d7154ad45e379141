"""Structured-pruning explorer: one slider per coupled group (kept channels), accuracy, size, FLOP
ratio and the MEASURED latency and speed-up of the really smaller model, live.

A knob is data (`GroupKnob`: group name, ``channels`` (units in the group), ``kind`` = "channels" |
"heads" | "ffn", the units ranked once, most important first, and the whole-model step that removes
them). Moving a slider keeps that many of the group's best units; the knobs of one step method
become one step (`register_group_step`: ``prune_groups`` is built in; head / FFN-width knobs of
transformer blocks come from `workbench.widgets.structured_heads.head_knobs`, whose module registers
``prune_heads``). `channel_knobs` ranks the coupled channel
groups of a CNN / MLP once (Torch-Pruning's dependency graph, `workbench.methods.group_pruning`).

Settings ``{group: kept, "batch": batch size}`` -> `Plan` (one step per method) -> `Engine.evaluate`
(memoised per plan: metric, params, bytes, FLOPs) and the built model -> latency of the original
and the pruned model at batch 1 and at the chosen batch, measured in the same run at fixed threads
(`workbench.measure.fixed_threads`, interleaved: `workbench.export.checks.interleaved_timings`,
median and quartiles of ``repeats`` runs after warm-up) -> bars + table, one draw; off the UI thread
(`workbench.widgets.explorer.Explorer`). The user's model is never modified (timings run on a copy).
"""
from __future__ import annotations

import copy
import html
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as widgets
from torch import nn

from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.export.checks import interleaved_timings
from workbench.export.measures import batch_of
from workbench.inventory import matrix_layers
from workbench.measure import SPEED_THREADS, fixed_threads
from workbench.methods import group_pruning
from workbench.methods.pruning import STRUCTURED_TIED, importance_data
from workbench.methods.units import unit_table
from workbench.plan import LayerPlan, Plan
from workbench.plotting.structured import draw_kept_units, draw_speedups, update_kept_units, update_speedups
from workbench.widgets.dashboard import direction_note
from workbench.widgets.explorer import Explorer

KINDS = ("channels", "heads", "ffn")
BATCHES = (8, 16, 32, 64, 128, 256)
_BUILT = 4  # pruned models kept (a batch change or a move back rebuilds nothing)


# --------------------------------------------------------------------------- knobs
@dataclass(frozen=True)
class GroupKnob:
    """One slider: how many of a group's ``channels`` units stay (1..channels; ``channels``: dense).

    name : the group (for "prune_groups": its root layer, as the step records it).
    channels : units in the group (output channels, attention heads or FFN hidden units).
    kind : "channels" | "heads" | "ffn".
    order : the unit indices, most important first (a permutation of ``range(channels)``).
    members : the layers whose width the group sets.
    method : the whole-model step removing the units (see `register_group_step`).
    """

    name: str
    channels: int
    kind: str = "channels"
    order: tuple[int, ...] = ()
    members: tuple[str, ...] = ()
    method: str = "prune_groups"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise WorkbenchError(f"kind={self.kind!r} of group {self.name!r} is not one of {', '.join(KINDS)}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise WorkbenchError(f"channels={self.channels!r} of group {self.name!r} must be an integer >= 1")
        if sorted(self.order) != list(range(self.channels)):
            raise WorkbenchError(f"order of group {self.name!r} must rank each of its {self.channels} units once")

    def check(self, kept: Any) -> int:
        """``kept`` if it is a whole number in 1..channels, else `WorkbenchError` naming the rule."""
        if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= self.channels:
            raise WorkbenchError(f"kept={kept!r} for group {self.name!r} must be an integer in 1..{self.channels} "
                                 f"({self.kind} kept; a group cannot be removed whole)")
        return kept

    def removed(self, kept: int) -> tuple[int, ...]:
        """Indices of the units removed when ``kept`` stay (the lowest ranked), ascending."""
        return tuple(sorted(self.order[self.check(kept):]))


@dataclass(frozen=True)
class GroupStep:
    """How the knobs of one step method become a step and are read back from one.

    build : ``(entries [(knob, removed indices)], context {"input_shape", "importance"}) -> LayerPlan``.
    read : ``step -> {group name: removed indices}``.
    """

    build: Callable[[list[tuple[GroupKnob, tuple[int, ...]]], Mapping[str, Any]], LayerPlan]
    read: Callable[[LayerPlan], dict[str, tuple[int, ...]]]


def _groups_step(entries, context) -> LayerPlan:
    matrices = context.get("matrices", ())
    members = [n for knob, _ in entries for n in knob.members]
    return LayerPlan("prune_groups", {
        "importance": context.get("importance", "magnitude"), "input_shape": tuple(context["input_shape"]),
        "roots": tuple(knob.name for knob, _ in entries), "members": tuple(knob.members for knob, _ in entries),
        "removed": tuple(removed for _, removed in entries),
        "kept": tuple(knob.channels - len(removed) for knob, removed in entries),
        "layers": tuple(dict.fromkeys(n for n in members if n in matrices))})


def _read_groups(step: LayerPlan) -> dict[str, tuple[int, ...]]:
    roots, removed = step.get("roots") or (), step.get("removed") or ()
    if len(roots) != len(removed):
        raise WorkbenchError(f"the prune_groups step has {len(roots)} roots but {len(removed)} 'removed' lists")
    return {root: tuple(rows) for root, rows in zip(roots, removed)}


_GROUP_STEPS: dict[str, GroupStep] = {"prune_groups": GroupStep(_groups_step, _read_groups)}


def register_group_step(method: str, build, read) -> None:
    """Let knobs with ``method`` (e.g. "prune_heads") become a step: see `GroupStep`."""
    _GROUP_STEPS[method] = GroupStep(build, read)


def channel_knobs(task, importance: str = "magnitude") -> list[GroupKnob]:
    """A "channels" knob per coupled channel group of ``task.model`` (Conv2d / Linear outputs but the
    output layer's; tied layers left out), channels ranked once by ``importance``, in module order."""
    model = task.model
    _, dense = unit_table(model, lambda info: STRUCTURED_TIED)
    frozen = [name for names in dense for name in names]
    rows = group_pruning.ranked_groups(copy.deepcopy(model), tuple(task.example_input.shape), importance,
                                       importance_data(task, importance), frozen)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    rows.sort(key=lambda row: order.get(row["root"], len(order)))
    return [GroupKnob(row["root"], len(row["scores"]), "channels", tuple(group_pruning.channel_order(row["scores"])),
                      tuple(row["members"])) for row in rows]


# --------------------------------------------------------------------------- explorer
def _spread(t: dict) -> str:
    return f"{t['median_ms']:.3f} [{t['q1_ms']:.3f}–{t['q3_ms']:.3f}]"


class StructuredExplorer(Explorer):
    """Kept-units sliders per group, a batch-size dropdown, bars (kept units; measured speed-up vs
    ``1 / FLOP ratio``) and a table (metric, params, bytes, FLOPs, latency at batch 1 and at the
    chosen batch, speed-up).

    Parameters
    ----------
    task : a `workbench.Task`; its model is never modified.
    knobs : the sliders (default: `channel_knobs` of the task's model).
    importance : channel ranking of the default knobs ("magnitude", "taylor", "hessian").
    batch : the initial batch size of the second latency (one of ``batches``).
    batches : the dropdown's batch sizes.
    repeats : timed runs per model and batch size (after 3 warm-up runs each); ``threads``: fixed threads.
    synchronous : compute in the caller's thread (tests, scripts).
    engine : the `Engine` (default: a new one on ``task.live_subset``).
    """

    config_path = "structured-configuration.json"

    def __init__(self, task, knobs: Sequence[GroupKnob] | None = None, importance: str = "magnitude", batch: int = 64,
                 batches: Sequence[int] = BATCHES, repeats: int = 20, threads: int = SPEED_THREADS,
                 synchronous: bool = False, engine: Engine | None = None):
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise WorkbenchError(f"repeats={repeats!r} must be an integer >= 1")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise WorkbenchError(f"threads={threads!r} must be an integer >= 1")
        batches = tuple(batches)
        if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 2 for b in batches):
            raise WorkbenchError(f"batches={batches!r} must be whole numbers >= 2 (batch 1 is always measured)")
        if batch not in batches:
            raise WorkbenchError(f"batch={batch!r} is not one of the batch sizes {list(batches)}")
        self.knobs = list(knobs) if knobs is not None else channel_knobs(task, importance)
        if not self.knobs:
            raise WorkbenchError(f"model {task.name!r} has no group of units a slider could prune")
        names = [knob.name for knob in self.knobs]
        if len(set(names)) != len(names) or "batch" in names:
            raise WorkbenchError(f"group names must be distinct and not 'batch'; got {names}")
        missing = sorted({knob.method for knob in self.knobs} - set(_GROUP_STEPS))
        if missing:
            raise WorkbenchError(f"no step is registered for the knobs' methods {missing} (register_group_step)")
        super().__init__(task, engine or Engine(task, subset=task.live_subset, preview=False), synchronous,
                         figsize=(9.0, 3.4), dpi=80)
        self._knobs = dict(zip(names, self.knobs))
        self.repeats, self.threads, self.importance = repeats, threads, importance
        self.context = {"input_shape": tuple(task.example_input.shape), "importance": importance,
                        "matrices": {info.name for info in matrix_layers(task.model)}}
        self.inputs = task.eval_inputs
        self._original: nn.Module = copy.deepcopy(task.model).eval()  # timed here; the user's model is not touched
        self._built: OrderedDict[Plan, nn.Module] = OrderedDict()
        self.base = dict(self.engine.base)

        for knob in self.knobs:
            slider = widgets.IntSlider(value=knob.channels, min=1, max=knob.channels, step=1,
                                       description=f"{knob.name} ({knob.kind})", continuous_update=True,
                                       style={"description_width": "200px"}, layout={"width": "520px"})
            slider.add_class("wb-group-slider")
            self.controls[knob.name] = slider
        self.sliders = {name: self.controls[name] for name in names}
        self.batch = widgets.Dropdown(options=list(batches), value=batch, description="batch size")
        self.controls["batch"] = self.batch
        self.table = widgets.HTML()
        self.table.add_class("wb-structured-table")

        ax_kept, ax_speed = self.view.figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        kinds = {knob.kind for knob in self.knobs}
        self.kept_bars = draw_kept_units(ax_kept, names, [k.channels for k in self.knobs],
                                         unit=kinds.pop() if len(kinds) == 1 else "units")
        self.speed_bars = draw_speedups(ax_speed)
        self.view.figure.tight_layout()
        self.compose([widgets.VBox(list(self.sliders.values())), self.batch], below_figure=[self.table])
        self.add_class("wb-structured")
        self.watch()
        self.refresh()

    # ------------------------------------------------------------------ settings and plans
    def kept(self) -> dict[str, int]:
        """The units each slider keeps now: ``{group: kept}``."""
        return {name: slider.value for name, slider in self.sliders.items()}

    def check_batch(self, batch: Any) -> int:
        if batch not in self.batch.options or isinstance(batch, bool):
            raise WorkbenchError(f"batch={batch!r} is not one of the batch sizes {list(self.batch.options)}")
        return int(batch)

    def plan_for(self, settings: dict) -> Plan:
        """One step per knob method, holding the groups whose slider is below full (all full: the
        empty plan). `WorkbenchError` for an unknown group or a kept count outside 1..channels."""
        unknown = [key for key in settings if key != "batch" and key not in self._knobs]
        if unknown:
            raise WorkbenchError(f"unknown groups {unknown}; groups: {', '.join(self._knobs)}")
        entries: dict[str, list] = {}
        for knob in self.knobs:
            removed = knob.removed(settings.get(knob.name, knob.channels))
            if removed:
                entries.setdefault(knob.method, []).append((knob, removed))
        steps = tuple(_GROUP_STEPS[method].build(rows, self.context) for method, rows in entries.items())
        return Plan({}, steps)

    def settings_for(self, plan: Plan) -> dict[str, int]:
        """The slider values showing ``plan``; `WorkbenchError` for per-layer entries, a step no knob
        makes, an unknown group, or removed units other than the lowest ranked."""
        if plan.layers:
            raise WorkbenchError(f"the plan sets layers {list(plan.layers)}; the structured explorer shows "
                                 "whole-model group steps only")
        values = {knob.name: knob.channels for knob in self.knobs}
        for step in plan.steps:
            if step.method not in {knob.method for knob in self.knobs}:
                raise WorkbenchError(f"the plan's step {step.method!r} is not one these sliders make "
                                     f"({', '.join(sorted({k.method for k in self.knobs}))})")
            for name, removed in _GROUP_STEPS[step.method].read(step).items():
                knob = self._knobs.get(name)
                if knob is None or knob.method != step.method:
                    raise WorkbenchError(f"the plan prunes group {name!r}, which has no slider here "
                                         f"(groups: {', '.join(self._knobs)})")
                kept = knob.channels - len(set(removed))
                if kept < 1:
                    raise WorkbenchError(f"group {name!r}: the plan removes all {knob.channels} of its units; "
                                         "a slider keeps at least 1")
                if tuple(sorted(removed)) != knob.removed(kept):
                    raise WorkbenchError(f"group {name!r}: the plan removes units {sorted(removed)[:8]}..., not "
                                         f"the {len(removed)} lowest ranked that its slider removes")
                values[name] = kept
        return values

    def widget_state(self) -> dict:
        return {"batch": self.batch.value}

    def set_widget_state(self, state: dict) -> None:
        if state.get("batch") in self.batch.options:
            self.batch.value = state["batch"]

    def set_kept(self, group: str, kept: int, wait: bool = True) -> dict:
        """Move one slider as a user would (checked first: nothing moves for a bad value); with
        ``wait``, return once the display shows it."""
        knob = self._knobs.get(group)
        if knob is None:
            raise WorkbenchError(f"unknown group {group!r}; groups: {', '.join(self._knobs)}")
        self.sliders[group].value = knob.check(kept)
        return self.wait() if wait else self.state

    def set_batch(self, batch: int, wait: bool = True) -> dict:
        """Choose the second latency's batch size (one of the dropdown's)."""
        self.batch.value = self.check_batch(batch)
        return self.wait() if wait else self.state

    # ------------------------------------------------------------------ compute
    def model_for(self, plan: Plan) -> nn.Module:
        """The pruned model ``plan`` builds (`Engine.build`: a new model; the last few kept)."""
        model = self._built.get(plan)
        if model is None:
            model = self._built[plan] = self.engine.build(plan).eval()
            while len(self._built) > _BUILT:
                self._built.popitem(last=False)
        self._built.move_to_end(plan)
        return model

    def compute(self, settings: dict) -> dict:
        """``{"kept", "batch", "plan", "result", "model", "flop_ratio", "latency", "speedup"}``.

        ``result``: `Engine.evaluate` of the plan (metric, params, bytes, FLOPs per sample);
        ``latency``: ``{batch: {"original", "pruned": {"median_ms", "q1_ms", "q3_ms", ...}}}`` for
        batch 1 and the chosen batch; ``speedup``: ``{batch: {"median", "low", "high"}}`` (original
        over pruned: medians; quartiles crossed for the range).
        """
        batch = self.check_batch(settings.get("batch", self.batch.value))
        plan = self.plan_for(settings)
        result = self.evaluate(plan)
        model = self.model_for(plan)
        latency, speed = {}, {}
        with fixed_threads(self.threads):
            for size in dict.fromkeys((1, batch)):
                t = interleaved_timings({"original": self._original, "pruned": model}, batch_of(self.inputs, size),
                                        repeats=self.repeats, warmup=3, rounds=min(5, self.repeats))
                latency[size] = t
                o, p = t["original"], t["pruned"]
                speed[size] = {"median": o["median_ms"] / p["median_ms"], "low": o["q1_ms"] / p["q3_ms"],
                               "high": o["q3_ms"] / p["q1_ms"]}
        kept = {knob.name: knob.check(settings.get(knob.name, knob.channels)) for knob in self.knobs}
        return {"kept": kept, "batch": batch, "plan": plan, "result": result, "model": model,
                "flop_ratio": result["flops"] / self.base["flops"], "latency": latency, "speedup": speed}

    # ------------------------------------------------------------------ render
    def table_html(self, state: dict) -> str:
        """The readout table of ``state`` (original | pruned | ratio)."""
        r, b, lat, speed = state["result"], self.base, state["latency"], state["speedup"]
        name = html.escape(f"{self.task.metric_name} ({direction_note(self.task)})")
        rows = [(name, f"{b['metric']:.4f}", f"{r['metric']:.4f}", f"{r['metric'] - b['metric']:+.4f}"),
                ("params", f"{b['params']:,}", f"{r['params']:,}", f"{r['params'] / b['params']:.1%}"),
                ("bytes (tensor payload)", f"{b['bytes']:,}", f"{r['bytes']:,}", f"{r['bytes'] / b['bytes']:.1%}"),
                ("FLOPs per sample", f"{b['flops']:,}", f"{r['flops']:,}", f"FLOP ratio {state['flop_ratio']:.3f}")]
        for size, t in lat.items():
            s = speed[size]
            rows.append((f"latency at batch {size} (ms, median [quartiles])", _spread(t["original"]),
                         _spread(t["pruned"]), f"speed-up <b>{s['median']:.2f}x</b> [{s['low']:.2f}–{s['high']:.2f}]"))
        body = "".join(f"<tr><td>{a}</td><td>{o}</td><td>{p}</td><td>{c}</td></tr>" for a, o, p, c in rows)
        return (f"<table><tr><th></th><th>original</th><th>pruned</th><th>pruned / original</th></tr>{body}</table>"
                f"<small>latency measured on this CPU at {self.threads} threads, original and pruned interleaved "
                f"in the same run, {self.repeats} runs each after 3 warm-up runs</small>")

    def render(self, state: dict) -> None:
        table = self.table_html(state)  # built before anything changes
        full = [knob.channels for knob in self.knobs]
        kept = [state["kept"][knob.name] for knob in self.knobs]
        metric = state["result"]["metric"]
        update_kept_units(self.kept_bars, kept, full,
                          f"{self.task.metric_name} {metric:.3f} (original {self.base['metric']:.3f}), "
                          f"{sum(kept)}/{sum(full)} kept")
        sizes = list(state["speedup"])
        speed = [state["speedup"][s] for s in sizes]
        update_speedups(self.speed_bars, sizes, [s["median"] for s in speed], [s["low"] for s in speed],
                        [s["high"] for s in speed], state["flop_ratio"],
                        f"FLOP ratio {state['flop_ratio']:.2f}, {self.threads} threads")
        self.table.value = table
        self.draw()
