"""Recovery explorer: pick a compression, press Fine-tune or Distill, watch the curves grow live,
and see the recovered model land on the accuracy-vs-size chart beside the uncompressed one.

Compute (`RecoveryExplorer.start`, run on a background thread so the kernel stays responsive)
is kept apart from rendering (`render_curves`, `render_chart`, which update existing artists).
Headless use and tests: ``RecoveryExplorer(task, background=False)`` runs synchronously, and
``wait()`` joins a background run.
"""
from __future__ import annotations

import html
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
from workbench.recovery.finetune import Recovery, distill_finetune, finetune
from workbench.registry import get_recipe, recipes
from workbench.widgets.figure_view import FigureView
from workbench.widgets.persistence import SaveLoadBar
from workbench.widgets.throttle import error_message

#: (label, recipe, options) tried by `default_compressions`; those whose recipe exists are offered.
DEFAULT_CHOICES = (
    ("SVD, 25% of parameters per layer", "svd", {"ratio": 0.25}),
    ("SVD, 50% of parameters per layer", "svd", {"ratio": 0.5}),
    ("pruning, 80% sparsity", "prune", {"ratio": 0.2}),
    ("quantization, 2 bits", "quant", {"bits": 2}),
    ("quantization, 4 bits", "quant", {"bits": 4}),
)


def default_compressions(task) -> dict[str, Plan]:
    """``{label: plan}`` for the built-in compressions available in this install."""
    known = set(recipes())
    plans = {}
    for label, recipe, options in DEFAULT_CHOICES:
        if recipe in known:
            try:
                plans[label] = get_recipe(recipe)(task.model, task=task, **options)
            except WorkbenchError:
                continue
    return plans


class RecoveryExplorer(widgets.VBox):
    """Fine-tune or distil a compressed ``task.model`` and watch it recover.

    Parameters
    ----------
    task : a `workbench.Task` with a training split.
    compressions : ``{label: Plan or compressed nn.Module}``; default `default_compressions`.
    epochs : initial value of the epochs box.
    background : train on a thread (notebooks); False runs synchronously (tests, scripts).
    """

    def __init__(self, task, compressions: Mapping[str, Plan | nn.Module] | None = None, *,
                 epochs: int = 15, background: bool = True):
        self.task = task
        self.compressions = dict(compressions) if compressions is not None else default_compressions(task)
        if not self.compressions:
            raise WorkbenchError("no compression to recover from; pass compressions={label: plan}")
        self.background = background
        self.history: list[dict] = []
        self.results: list[dict] = []
        self.last: Recovery | None = None
        self._models: dict[str, nn.Module] = {}
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_draw = 0.0

        self.choice = widgets.Dropdown(options=list(self.compressions), description="compression",
                                       style={"description_width": "initial"}, layout={"width": "380px"})
        self.epochs = widgets.BoundedIntText(value=epochs, min=1, max=500, description="epochs",
                                             layout={"width": "160px"})
        self.temperature = widgets.FloatSlider(value=4.0, min=0.5, max=20.0, step=0.5, description="T")
        self.alpha = widgets.FloatSlider(value=0.9, min=0.0, max=1.0, step=0.05, description="alpha")
        self.learn_scales = widgets.Checkbox(value=True, description="learn quantization steps (QAT)")
        self.finetune_button = widgets.Button(description="Fine-tune", button_style="primary")
        self.distill_button = widgets.Button(description="Distill", button_style="info")
        self.cancel_button = widgets.Button(description="Cancel", button_style="warning", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=epochs, description="epoch")
        self.status = widgets.HTML(value="Pick a compression and press Fine-tune or Distill.")
        self.finetune_button.on_click(lambda _: self.start("finetune"))
        self.distill_button.on_click(lambda _: self.start("distill"))
        self.cancel_button.on_click(lambda _: self.cancel())

        self._build_figure()
        controls = [widgets.HBox([self.choice, self.epochs]), widgets.HBox([self.temperature, self.alpha]),
                    self.learn_scales,
                    widgets.HBox([self.finetune_button, self.distill_button, self.cancel_button, self.progress]),
                    self.status]
        self.persistence = SaveLoadBar(self, "recovery-configuration.json")  # save / load (issue 9)
        super().__init__(children=controls + [self.view, self.persistence])
        self.render_chart()

    # ------------------------------------------------------------------ save / load
    def plan(self) -> Plan:
        """The plan of the chosen compression (the protocol of `workbench.widgets.persistence`);
        `WorkbenchError` for a compression given as a ready-made model."""
        entry = self.compressions[self.choice.value]
        if not isinstance(entry, Plan):
            raise WorkbenchError(f"the compression {self.choice.value!r} was given as a ready-made "
                                 f"{type(entry).__name__}, not a plan; only plans can be saved")
        return entry

    def set_plan(self, plan: Plan) -> None:
        """Choose the compression whose plan is ``plan``; a plan not offered yet is built (so a bad
        setting is refused with `WorkbenchError`, choice untouched) and added as "saved configuration"."""
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
        self.figure_view = FigureView((11, 3.4))
        self.figure, self.view = self.figure_view.figure, self.figure_view.widget
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
        self.figure_view.draw()

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
        return self._thread is not None and self._thread.is_alive()

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
        args = (kind, self.choice.value, int(self.epochs.value), float(self.temperature.value),
                float(self.alpha.value), bool(self.learn_scales.value))
        if self.background:
            self._thread = threading.Thread(target=self._run, args=args, daemon=True)
            self._thread.start()
        else:
            self._run(*args)

    def cancel(self) -> None:
        """Stop the current run after the current batch; the compressed model stays as it was."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a background run has finished."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _on_epoch(self, entry: dict) -> None:
        self.history.append(entry)
        self.render_curves()

    def _run(self, kind: str, label: str, epochs: int, temperature: float, alpha: float,
             learn_scales: bool) -> None:
        try:
            model = self.compressed_model(label)
            options = {"epochs": epochs, "cancel": self._cancel, "on_epoch": self._on_epoch,
                       "progress": False, "learn_scales": learn_scales}
            if kind == "distill":
                result = distill_finetune(model, self.task, temperature=temperature, alpha=alpha, **options)
            else:
                result = finetune(model, self.task, **options)
            self._finish(label, kind, model, result)
        except Exception as exc:  # noqa: BLE001 - a widget shows a message, never a traceback
            self.status.value = f"<span style='color:#b00'>{html.escape(error_message(exc))}</span>"
        finally:
            self._set_running(False)
            self.render_curves(force=True)

    def _finish(self, label: str, kind: str, before_model: nn.Module, result: Recovery) -> None:
        self.last = result
        if result.cancelled:
            self.status.value = (f"Cancelled after {len(result.history)} epoch(s); "
                                 f"<b>{label}</b> is unchanged.")
            return
        before = self.task.evaluate(before_model)
        after = self.task.evaluate(result.model)
        size = saved_bytes(result.model)
        self.results.append({"label": label, "kind": kind, "bytes": size, "before": before, "after": after,
                             "best_epoch": result.best_epoch, "epochs": len(result.history)})
        add_result(self.chart, size, before, after, f"{kind}")
        self.status.value = (f"<b>{label}</b>, {kind}: test {self.task.metric_name} {before:.3f} -> "
                             f"<b>{after:.3f}</b> (uncompressed {self.task.evaluate():.3f}); "
                             f"best epoch {result.best_epoch} of {len(result.history)}, {size} bytes.")

    def _set_running(self, running: bool) -> None:
        self.finetune_button.disabled = running
        self.distill_button.disabled = running
        self.cancel_button.disabled = not running
