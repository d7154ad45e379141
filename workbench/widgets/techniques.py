"""Live figures of lesson 09 (more techniques): one control, one figure, drawn from the compute thread.

`LiveFigure` is the small version of the explorer contract (`workbench.widgets.explorer`)::

    control change -> Coalescer.submit(value) -> compute(value) -> result     (worker thread)
        -> render(result): readout and existing artists updated, one PNG    (same thread)

The figure is a `workbench.widgets.figure_view.FigureImage` (an ``ipywidgets.Image`` whose value is
replaced), the path that reaches the page from a worker thread; nothing is drawn into an
``Output`` widget; displayed, a view's output also carries the figure as ``image/png`` (static
readers). ``synchronous=True`` computes in the caller (tests); ``update(value)`` moves the
control and returns the state once shown. Errors become one line (``error``), never a traceback.

The four views: `L1View` (L1 strength -> magnitude histogram, accuracy and sparsity after the cut),
`FoldView` (batch size -> latency before / after BatchNorm folding), `ExportView` (compression ->
file sizes and round-trip errors) and `SweepView` (method -> sensitivity curves of a finished sweep).
"""
from __future__ import annotations

import html
import tempfile
from typing import Any, Callable, Mapping, Sequence

import ipywidgets as widgets
import numpy as np

from workbench.errors import WorkbenchError
from workbench.export.checks import export_round_trip, interleaved_timings
from workbench.export.measures import batch_of
from workbench.plan import Plan
from workbench.plotting.techniques import (draw_accuracy_sparsity, draw_latency_bars, draw_layer_curves,
                                           draw_magnitudes, draw_size_bars, update_accuracy_sparsity,
                                           update_latency_bars, update_layer_curves, update_magnitudes,
                                           update_size_bars)
from workbench.recovery.pruning_train import l1_regularised_pruning
from workbench.widgets.figure_view import FigureImage, StaticFigure
from workbench.widgets.throttle import Coalescer


class LiveFigure(StaticFigure, widgets.VBox):
    """``control`` + readout + error line + figure; see the module docstring.

    Parameters
    ----------
    control : a widget with a ``value`` trait.
    figsize : ``(width, height)`` in inches of the figure host ``view``.
    synchronous : compute in the caller's thread instead of a worker thread.
    """

    def __init__(self, control: widgets.Widget, figsize: tuple[float, float], synchronous: bool = False):
        self.control = control
        self.view = FigureImage(figsize)
        self.readout = widgets.HTML()
        self.error = widgets.HTML()
        self.error.add_class("wb-explorer-error")
        self.state: dict = {}
        self.coalescer = Coalescer(self.compute, self._show, self._show_error, synchronous=synchronous)
        super().__init__([control, self.readout, self.error, self.view.widget])
        self.add_class("wb-explorer")
        control.observe(lambda change: self.coalescer.submit(change["new"]), names="value")

    def compute(self, value: Any) -> dict:
        """The result for the control's ``value`` (worker thread: reads no widget)."""
        raise NotImplementedError

    def render(self, result: dict) -> str:
        """Update the artists for ``result``; return the readout (HTML)."""
        raise NotImplementedError

    def start(self) -> "LiveFigure":
        """Compute and show the control's value now, in the caller's thread (first display)."""
        self.coalescer.run(self.control.value)
        return self

    def _show(self, result: dict) -> None:
        self.readout.value = self.render(result)
        self.view.draw()
        self.state = result
        self.error.value = ""

    def _show_error(self, message: str) -> None:
        self.error.value = f"<span style='color:#b00'>&#9888; {html.escape(message, quote=False)}</span>"

    def update(self, value: Any, timeout: float = 120.0) -> dict:
        """Move the control to ``value`` and return ``state`` once it is shown."""
        self.control.value = value
        if not self.coalescer.wait(timeout):
            raise WorkbenchError(f"{type(self).__name__} is still computing after {timeout} s")
        return self.state


class L1View(LiveFigure):
    """L1 strength slider: train a copy with ``loss + l1 * sum|w|`` (`l1_regularised_pruning`),
    cut ``|w| <= threshold``; show the trained weights' magnitudes and accuracy against sparsity.

    ``strengths``: the slider's values (0 = plain training). Each strength trains once (memoised).
    """

    def __init__(self, task, strengths: Sequence[float] = (0.0, 1e-4, 3e-4, 1e-3), epochs: int = 4,
                 threshold: float = 1e-2, synchronous: bool = False):
        if not strengths or any(not s >= 0 for s in strengths):
            raise WorkbenchError(f"strengths={list(strengths)!r} must be a non-empty list of values >= 0")
        self.task, self.epochs, self.threshold = task, epochs, threshold
        self.runs: dict[float, dict] = {}
        slider = widgets.SelectionSlider(options=[(f"{s:g}", float(s)) for s in strengths],
                                         value=float(strengths[0]), description="L1 strength",
                                         continuous_update=False, style={"description_width": "initial"},
                                         layout={"width": "420px"})
        super().__init__(slider, (10, 3.3), synchronous)
        ax_hist, ax_acc = self.view.figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
        self.histogram = draw_magnitudes(ax_hist, threshold)
        self.scatter = draw_accuracy_sparsity(ax_acc, task.evaluate(), task.metric_name)
        self.view.figure.tight_layout()
        self.start()

    def compute(self, strength: float) -> dict:
        """``{"strength", "magnitudes" (|w| of every pruned layer), "pruned" (fraction), "metric"
        (after the cut), "dense_metric" (trained, before the cut), "model" (pruned)}``."""
        if strength not in self.runs:
            run = l1_regularised_pruning(self.task, l1=strength, epochs=self.epochs, threshold=self.threshold)
            magnitudes = np.concatenate([run.model.get_submodule(name).weight.detach().abs().cpu().numpy().ravel()
                                         for name in run.plan.layers])
            self.runs[strength] = {"strength": strength, "magnitudes": magnitudes,
                                   "pruned": 1.0 - run.history[-1]["kept"], "metric": run.history[-1]["metric"],
                                   "dense_metric": self.task.evaluate(run.model), "model": run.pruned}
        return self.runs[strength]

    def render(self, result: dict) -> str:
        update_magnitudes(self.histogram, result["magnitudes"],
                          f"trained with L1 = {result['strength']:g}: {result['pruned']:.1%} of |w| <= {self.threshold:g}")
        update_accuracy_sparsity(self.scatter, [(r["pruned"], r["metric"]) for r in self.runs.values()],
                                 (result["pruned"], result["metric"]))
        name = self.task.metric_name
        return (f"L1 = {result['strength']:g}: {result['pruned']:.1%} of the weights cut, test {name} "
                f"<b>{result['metric']:.3f}</b> after the cut ({result['dense_metric']:.3f} before it)")


class FoldView(LiveFigure):
    """Batch-size dropdown: median latency (quartiles as error bars) of a model and its BN-folded copy.

    ``models``: ``{label: model}`` (e.g. original and folded); ``inputs``: ``(n, ...)`` rows to batch.
    """

    def __init__(self, models: Mapping[str, Any], inputs, batches: Sequence[int] = (1, 64, 256),
                 repeats: int = 30, synchronous: bool = False):
        self.models, self.inputs, self.repeats = dict(models), inputs, repeats
        self.timings: dict[int, dict] = {}
        dropdown = widgets.Dropdown(options=list(batches), value=batches[0], description="batch size")
        super().__init__(dropdown, (6, 3.2), synchronous)
        self.bars = draw_latency_bars(self.view.figure.subplots(), list(self.models))
        self.view.figure.tight_layout()
        self.start()

    def compute(self, batch: int) -> dict:
        """``{"batch", "timings": {label: timing dict}}`` (`interleaved_timings`, once per batch size)."""
        if batch not in self.timings:
            x = batch_of(self.inputs, int(batch))
            self.timings[batch] = {"batch": batch, "timings": interleaved_timings(self.models, x, self.repeats)}
        return self.timings[batch]

    def render(self, result: dict) -> str:
        timings = result["timings"]
        update_latency_bars(self.bars, list(timings.values()), f"batch {result['batch']}, {self.repeats} repeats")
        (a, ta), (b, tb) = list(timings.items())[:2]
        ratio = ta["median_ms"] / tb["median_ms"]
        spread = max(ta["q3_ms"] - ta["q1_ms"], tb["q3_ms"] - tb["q1_ms"])
        verdict = ("within the spread: no measurable difference" if abs(ta["median_ms"] - tb["median_ms"]) <= spread
                   else f"{b} {'faster' if ratio > 1 else 'slower'} ({ratio:.2f}x)")
        return (f"batch {result['batch']}: {a} {ta['median_ms']:.3f} ms, {b} {tb['median_ms']:.3f} ms "
                f"(medians; widest quartile spread {spread:.3f} ms): {verdict}")


class ExportView(LiveFigure):
    """Compression dropdown: write it as safetensors and ONNX (`export_round_trip`), show the file
    sizes beside the dense model's and the round-trip errors.

    ``plans``: ``{label: Plan}`` for ``task.model``; files go to ``folder`` (default: a temporary one).
    """

    formats = ("safetensors", "onnx")

    def __init__(self, task, plans: Mapping[str, Plan], folder=None, synchronous: bool = False):
        if not plans:
            raise WorkbenchError("plans is empty: give at least one {label: Plan}")
        self.task, self.plans = task, dict(plans)
        self._temporary = None if folder is not None else tempfile.TemporaryDirectory()
        self.folder = folder if folder is not None else self._temporary.name
        self.results: dict[str, dict] = {}
        dropdown = widgets.Dropdown(options=list(self.plans), description="compression",
                                    style={"description_width": "initial"})
        super().__init__(dropdown, (6, 3.2), synchronous)
        self.bars = draw_size_bars(self.view.figure.subplots(), self.formats)
        self.view.figure.tight_layout()
        self.start()

    def compute(self, label: str) -> dict:
        """`export_round_trip` of the plan ``label`` (memoised)."""
        if label not in self.results:
            self.results[label] = export_round_trip(self.task.model, self.plans[label], self.task.eval_inputs,
                                                    self.folder, self.task.name, label=_file_label(label))
            self.results[label]["label"] = label
        return self.results[label]

    def render(self, result: dict) -> str:
        dense = [result["dense_safetensors_bytes"], result["dense_onnx_bytes"]]
        compressed = [result["safetensors_bytes"], result["onnx_bytes"]]
        update_size_bars(self.bars, dense, compressed, f"{result['label']}: files written (% of dense)")
        notes = "".join(f"<br><i>{html.escape(note)}</i>" for note in result["onnx_notes"])
        return (f"safetensors {result['safetensors_bytes']:,} B (dense {dense[0]:,} B), reloaded: max |diff| "
                f"{result['load_max_diff']:.2g} · ONNX {result['onnx_bytes']:,} B (dense {dense[1]:,} B), "
                f"onnxruntime vs torch: max |diff| {result['onnx_max_diff']:.2g}{notes}")


def _file_label(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label).strip("-") or "model"


class SweepView(LiveFigure):
    """Method dropdown over finished sensitivity sweeps (`workbench.select.sensitivity` results):
    one curve per layer, validation metric against the method's setting."""

    def __init__(self, results: Mapping[str, Any], synchronous: bool = False,
                 describe: Callable[[Any], str] | None = None):
        if not results:
            raise WorkbenchError("results is empty: give at least one {method: SensitivityResult}")
        self.results = dict(results)
        first = next(iter(self.results.values()))
        dropdown = widgets.Dropdown(options=list(self.results), description="method")
        super().__init__(dropdown, (7, 3.2), synchronous)
        self.curves = draw_layer_curves(self.view.figure.subplots(), first.layers, first.baseline, first.metric_name)
        self.view.figure.tight_layout()
        self.start()

    def compute(self, method: str) -> dict:
        result = self.results[method]
        j = min(range(len(result.grid)), key=result.grid.__getitem__)  # the harshest setting
        worst = min(range(len(result.layers)), key=lambda i: result.metric[i][j])
        return {"method": method, "result": result, "most_sensitive": result.layers[worst], "at": j}

    def render(self, state: dict) -> str:
        result = state["result"]
        update_layer_curves(self.curves, result.grid, result.metric, result.option,
                            f"{state['method']}: each layer compressed alone")
        j = state["at"]
        row = result.metric[result.layers.index(state["most_sensitive"])]
        return (f"{state['method']}: at {result.option} = {result.grid[j]:g} the most sensitive layer is "
                f"<b>{state['most_sensitive']}</b> (validation {result.metric_name} {row[j]:.3f}, "
                f"uncompressed {result.baseline:.3f})")
