"""Recovery explorer: pick a compression, press Fine-tune or Distill, watch the curves grow live,
and see the recovered model land on the accuracy-vs-size chart beside the uncompressed one.

It follows the explorer contract (`workbench.widgets.explorer.Explorer`), with a button instead of
a slider starting the computation: ``start(kind)`` -> the coalescer's worker thread (so the kernel
stays responsive) -> `compute` (the chosen `Plan` applied once by `workbench.apply`, then
`finetune` / `distill_finetune`; each epoch updates the curves, at most 4 draws a second) ->
`render` (the result on the size chart and the status line). ``plan`` is the chosen compression.
Headless use and tests: ``RecoveryExplorer(task, background=False)`` runs synchronously, and
``wait()`` returns once a background run has finished.
"""
from __future__ import annotations

import threading
import time
from typing import Mapping

import ipywidgets as widgets
from torch import nn

from workbench.compress import apply
from workbench.errors import WorkbenchError
from workbench.measure import saved_bytes
from workbench.plan import Plan
from workbench.plotting.recovery import add_result, draw_curves, draw_size_chart, update_curves
from workbench.recovery import Recovery, distill_finetune, finetune
from workbench.registry import recipe, recipes
from workbench.widgets.explorer import Explorer

#: (label, recipe, options) tried by `default_compressions`; those whose recipe exists are offered.
#: The 2-bit preset takes its range from the largest weight (``clip="max"``): most weights round
#: to 0, a heavy damage to recover from (the default ``"mse"`` range loses far less before training).
DEFAULT_CHOICES = (
    ("SVD, 25% of parameters per layer", "svd", {"ratio": 0.25}),
    ("SVD, 50% of parameters per layer", "svd", {"ratio": 0.5}),
    ("pruning, 80% sparsity", "prune", {"ratio": 0.2}),
    ("quantization, 2 bits, range = largest weight", "quant", {"bits": 2, "clip": "max"}),
    ("quantization, 4 bits", "quant", {"bits": 4}),
)


def default_compressions(task) -> dict[str, Plan]:
    """``{label: plan}`` for the built-in compressions available in this install."""
    known = set(recipes())
    plans = {}
    for label, name, options in DEFAULT_CHOICES:
        if name in known:
            try:
                plans[label] = recipe(name)(task.model, task=task, **options)
            except WorkbenchError:
                continue
    return plans


class RecoveryExplorer(Explorer):
    """Fine-tune or distil a compressed ``task.model`` and watch it recover.

    Parameters
    ----------
    task : a `workbench.Task` with a training split.
    compressions : ``{label: Plan or compressed nn.Module}``; default `default_compressions`.
    epochs : initial value of the epochs box.
    background : train on a thread (notebooks); False runs synchronously (tests, scripts).
    """

    config_path = "recovery-configuration.json"

    def __init__(self, task, compressions: Mapping[str, Plan | nn.Module] | None = None, *,
                 epochs: int = 15, background: bool = True):
        super().__init__(task, synchronous=not background, figsize=(11, 3.4))
        self.compressions = dict(compressions) if compressions is not None else default_compressions(task)
        if not self.compressions:
            raise WorkbenchError("no compression to recover from; pass compressions={label: plan}")
        self.background = background
        self.history: list[dict] = []
        self.results: list[dict] = []
        self.last: Recovery | None = None
        self._models: dict[str, nn.Module] = {}
        self._cancel = threading.Event()
        self._last_draw = 0.0

        self.choice = widgets.Dropdown(options=list(self.compressions), description="compression",
                                       style={"description_width": "initial"}, layout={"width": "380px"})
        self.epochs = widgets.BoundedIntText(value=epochs, min=1, max=500, description="epochs",
                                             layout={"width": "160px"})
        self.temperature = widgets.FloatSlider(value=4.0, min=0.5, max=20.0, step=0.5, description="T")
        self.alpha = widgets.FloatSlider(value=0.9, min=0.0, max=1.0, step=0.05, description="alpha")
        self.learn_scales = widgets.Checkbox(value=True, description="learn quantization steps (QAT)")
        self.controls.update(choice=self.choice, epochs=self.epochs, temperature=self.temperature,
                             alpha=self.alpha, learn_scales=self.learn_scales)  # read when a run starts
        self.finetune_button = widgets.Button(description="Fine-tune", button_style="primary")
        self.distill_button = widgets.Button(description="Distill", button_style="info")
        self.cancel_button = widgets.Button(description="Cancel", button_style="warning", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=epochs, description="epoch")
        self.status = widgets.HTML(value="Pick a compression and press Fine-tune or Distill.")
        self.finetune_button.on_click(lambda _: self.start("finetune"))
        self.distill_button.on_click(lambda _: self.start("distill"))
        self.cancel_button.on_click(lambda _: self.cancel())

        self._build_figure()
        self.compose([widgets.HBox([self.choice, self.epochs]), widgets.HBox([self.temperature, self.alpha]),
                      self.learn_scales,
                      widgets.HBox([self.finetune_button, self.distill_button, self.cancel_button, self.progress]),
                      self.status])
        self.render_chart()

    # ------------------------------------------------------------------ save / load
    def plan_for(self, settings: dict) -> Plan:
        """The plan of the compression ``settings["choice"]``; `WorkbenchError` for a compression
        given as a ready-made model."""
        entry = self.compressions[settings["choice"]]
        if not isinstance(entry, Plan):
            raise WorkbenchError(f"the compression {settings['choice']!r} was given as a ready-made "
                                 f"{type(entry).__name__}, not a plan; only plans can be saved")
        return entry

    def set_plan(self, plan: Plan) -> None:
        """Choose the compression whose plan is ``plan``; a plan not offered yet is built (so a bad
        setting is refused with `WorkbenchError`, choice untouched) and added as "saved configuration"."""
        if not isinstance(plan, Plan):
            raise WorkbenchError(f"set_plan needs a workbench.Plan, got {type(plan).__name__}")
        for label, entry in self.compressions.items():
            if isinstance(entry, Plan) and entry == plan:
                self.choice.value = label
                return
        model = apply(self.task.model, plan, self.task.calibration_inputs())
        label, n = "saved configuration", 2
        while label in self.compressions:
            label, n = f"saved configuration {n}", n + 1
        self.compressions[label] = plan
        self._models[label] = model
        self.choice.options = list(self.compressions)
        self.choice.value = label

    def widget_state(self) -> dict:
        """The run settings (the plan is the chosen compression)."""
        return {"choice": self.choice.value, "epochs": int(self.epochs.value),
                "temperature": float(self.temperature.value), "alpha": float(self.alpha.value),
                "learn_scales": bool(self.learn_scales.value)}

    def set_widget_state(self, state: dict) -> None:
        """Restore the run settings that fit their controls (others are left as they are)."""
        label = state.get("choice")
        if label in self.compressions and self.compressions[label] == self.compressions[self.choice.value]:
            self.choice.value = label  # of two labels with the same plan, the one saved
        for control, key in ((self.epochs, "epochs"), (self.temperature, "temperature"), (self.alpha, "alpha")):
            value = state.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and control.min <= value <= control.max:
                control.value = value
        if isinstance(state.get("learn_scales"), bool):
            self.learn_scales.value = state["learn_scales"]

    # ------------------------------------------------------------------ view
    def _build_figure(self) -> None:
        self.figure = self.view.figure
        ax_loss, ax_metric, ax_size = self.figure.subplots(1, 3)
        self.curves = draw_curves(ax_loss, ax_metric, self.task.metric_name)
        self.chart = draw_size_chart(ax_size, saved_bytes(self.task.model), self.task.evaluate(),
                                     self.task.metric_name, "bytes on disk")
        self.figure.tight_layout()

    def _draw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_draw < 0.25:  # coalesce: at most 4 redraws a second
            return
        self._last_draw = now
        self.draw()

    def render_curves(self, force: bool = False) -> None:
        """Update the loss/metric lines from ``self.history``."""
        h = self.history
        update_curves(self.curves, [e["epoch"] for e in h], [e["loss"] for e in h],
                      [e["val_loss"] for e in h], [e["metric"] for e in h])
        self.progress.value = len(h)
        self._draw(force)

    def render_chart(self) -> None:
        self._draw(force=True)

    # ------------------------------------------------------------------ compute
    def compressed_model(self, label: str) -> nn.Module:
        """The compressed model for ``label`` (built once from its plan, then reused)."""
        if label not in self._models:
            entry = self.compressions[label]
            self._models[label] = (apply(self.task.model, entry, self.task.calibration_inputs())
                                   if isinstance(entry, Plan) else entry)
        return self._models[label]

    @property
    def running(self) -> bool:
        return self.coalescer.busy

    def start(self, kind: str) -> None:
        """Start fine-tuning (``kind="finetune"``) or distillation (``"distill"``) of the chosen compression."""
        if self.running:
            self.status.value = "A run is in progress; cancel it first."
            return
        self._cancel.clear()
        self.history = []
        self.progress.max = int(self.epochs.value)
        self.render_curves(force=True)
        self._set_running(True)
        self.status.value = f"{'Distilling' if kind == 'distill' else 'Fine-tuning'} <b>{self.choice.value}</b> ..."
        self.request(kind=kind)

    def cancel(self) -> None:
        """Stop the current run after the current batch; the compressed model stays as it was."""
        self._cancel.set()

    def _on_epoch(self, entry: dict) -> None:
        self.history.append(entry)
        self.render_curves()

    def compute(self, settings: dict) -> dict:
        """Train the compression ``settings["choice"]`` (``settings["kind"]``: "finetune" or
        "distill") and measure it: ``{"label", "kind", "cancelled", "epochs"}`` and, unless
        cancelled, ``"bytes"`` (on disk), ``"before"`` / ``"after"`` (test metric), ``"best_epoch"``."""
        label, kind = settings["choice"], settings.get("kind", "finetune")
        try:
            model = self.compressed_model(label)
            options = {"epochs": settings["epochs"], "cancel": self._cancel, "on_epoch": self._on_epoch,
                       "progress": False, "learn_scales": settings["learn_scales"]}
            if kind == "distill":
                result = distill_finetune(model, self.task, temperature=settings["temperature"],
                                          alpha=settings["alpha"], **options)
            else:
                result = finetune(model, self.task, **options)
            self.last = result
            outcome = {"label": label, "kind": kind, "cancelled": result.cancelled, "epochs": len(result.history)}
            if not result.cancelled:
                outcome.update(bytes=saved_bytes(result.model), before=self.task.evaluate(model),
                               after=self.task.evaluate(result.model), best_epoch=result.best_epoch)
            return outcome
        finally:
            self._set_running(False)
            self.render_curves(force=True)

    def render(self, outcome: dict) -> None:
        label, kind = outcome["label"], outcome["kind"]
        if outcome["cancelled"]:
            self.status.value = f"Cancelled after {outcome['epochs']} epoch(s); <b>{label}</b> is unchanged."
            return
        self.results.append({key: outcome[key] for key in
                             ("label", "kind", "bytes", "before", "after", "best_epoch", "epochs")})
        add_result(self.chart, outcome["bytes"], outcome["before"], outcome["after"], f"{kind}")
        self.status.value = (f"<b>{label}</b>, {kind}: test {self.task.metric_name} {outcome['before']:.3f} -> "
                             f"<b>{outcome['after']:.3f}</b> (uncompressed {self.task.evaluate():.3f}); "
                             f"best epoch {outcome['best_epoch']} of {outcome['epochs']}, {outcome['bytes']} bytes.")
        self._draw(force=True)

    def show_error(self, message: str) -> None:
        super().show_error(message)
        self.status.value = "The run stopped with an error (below)."

    def _set_running(self, running: bool) -> None:
        self.finetune_button.disabled = running
        self.distill_button.disabled = running
        self.cancel_button.disabled = not running
