"""`Task`: a model together with the data and metric it is judged by."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError
from workbench.zoo.outputs import OutputChoice, select_output

Metric = Callable[[torch.Tensor, torch.Tensor], float]


def check_finite(value: Any, metric_name: str, where: str = "") -> float:
    """``float(value)``, or a `WorkbenchError` naming the metric when it is NaN or infinite
    (a NaN would otherwise flow into the readouts, the allocator and the Pareto front)."""
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise WorkbenchError(f"metric {metric_name!r} returned {type(value).__name__}, not a number") from None
    if not math.isfinite(number):
        place = f" {where}" if where else ""
        raise WorkbenchError(f"metric {metric_name!r} is {number}{place}: a metric must be a finite number; "
                             "the workbench refuses it rather than compare or chart it")
    return number


class CheckedMetric:
    """The user's ``metric(outputs, targets)`` with its result checked by `check_finite`, so that
    every caller (the engine, recovery, selection) gets a finite float or a clear error."""

    def __init__(self, metric: Metric, name: str):
        self.metric, self.__name__ = metric, name

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return check_finite(self.metric(outputs, targets), self.__name__)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; each submodule's own train/eval flag restored after
    (a model in training mode with a frozen, eval-mode part comes back exactly as it was)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@dataclass
class Task:
    """A model with its evaluation data and metric.

    Attributes
    ----------
    name : the model's name (``"digits-mlp"``, ``"minilm"``, or the user's).
    model : the original model. The workbench never modifies it, its mode included: every
        evaluation runs it in eval mode and restores each submodule's mode after (`evaluation_mode`).
    eval_inputs : ``(n, ...)`` evaluation inputs (the test split for the digits models).
    eval_targets : labels ``(n,)``, reference outputs when the metric is output fidelity, or the
        token ids ``(n, T)`` themselves for a causal language model's perplexity.
    metric : ``metric(outputs, targets) -> float``; see ``higher_is_better``.
    metric_name : what ``metric`` measures (``"accuracy"``).
    train_inputs, train_targets : training split where there is one (fine-tuning, recovery,
        calibration); targets as ``eval_targets``.
    val_inputs, val_targets : a validation split the model was never trained on, where there is
        one (the digits models): what sensitivity, allocation and early stopping judge by. Without
        one, they use the training split: early stopping holds out a part of it, sensitivity and
        allocation score samples of it.
    description : one line for listings.
    live_subset : evaluation samples the live tools use by default (`workbench.engine.Engine`,
        ``bench latency``) where a full evaluation is too slow for a slider move; None = all.
    higher_is_better : True for accuracy or fidelity; False for a loss or a perplexity. Compare
        two metric values with `better`, never with ``>``.
    output : which tensor of the model's output is judged: None (the natural one: ``logits``,
        ``last_hidden_state`` or the first tensor), a key, an index or a callable; see
        `workbench.zoo.outputs.select_output`. Applied to each batch's output by `outputs` and
        the engine.
    calibration : ``(n, ...)`` inputs for data-aware methods when the user gave some; see
        `calibration_inputs`.
    """

    name: str
    model: nn.Module
    eval_inputs: torch.Tensor
    eval_targets: torch.Tensor
    metric: Metric
    metric_name: str = "accuracy"
    train_inputs: torch.Tensor | None = None
    train_targets: torch.Tensor | None = None
    description: str = ""
    extras: dict = field(default_factory=dict)
    live_subset: int | None = None
    higher_is_better: bool = True
    output: OutputChoice = None
    calibration: torch.Tensor | None = None
    val_inputs: torch.Tensor | None = None
    val_targets: torch.Tensor | None = None

    @property
    def example_input(self) -> torch.Tensor:
        """One evaluation sample with its batch dimension: ``(1, ...)``."""
        return self.eval_inputs[:1]

    def subset(self, n: int | None) -> "Task":
        """The same task judged on ``n`` evenly spaced evaluation samples (deterministic).

        Indices are ``round(linspace(0, N - 1, n))``, in order, so data stored group by group
        (MiniLM's topics) keep every group. ``n=None`` or ``n >= N``: this task itself. The model,
        training data and extras are shared, not copied.
        """
        total = len(self.eval_inputs)
        if n is None or n >= total:
            return self
        if n < 1:
            raise WorkbenchError(f"subset={n} must be at least 1 (the task has {total} evaluation samples)")
        index = torch.linspace(0, total - 1, n).round().long()
        return dataclasses.replace(self, eval_inputs=self.eval_inputs[index], eval_targets=self.eval_targets[index],
                                   live_subset=None)

    def calibration_inputs(self, n: int = 512) -> torch.Tensor:
        """Up to ``n`` inputs for data-aware methods: ``calibration`` if given, else the training
        inputs; the evaluation inputs only for a task that has neither."""
        for source in (self.calibration, self.train_inputs, self.eval_inputs):
            if source is not None:
                return source[:n]
        raise WorkbenchError(f"task {self.name!r} has no inputs")

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b`` (see ``higher_is_better``)."""
        return a > b if self.higher_is_better else a < b

    def select(self, out: Any) -> torch.Tensor:
        """The judged tensor of one batch's model output (``output``; see `select_output`)."""
        return select_output(out, self.output)

    @torch.no_grad()
    def outputs(self, model: nn.Module | None = None, batch_size: int = 4096,
                inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Judged outputs ``(n, ...)`` of ``model`` (default: the original) on ``inputs`` (default:
        the evaluation inputs), batch by batch, in eval mode; the model's modes are restored.

        Each batch runs on the model's device (`workbench.device.model_device`); the outputs come
        back on the inputs' device, where the targets are, so the metric sees the data's device."""
        model = self.model if model is None else model
        inputs = self.eval_inputs if inputs is None else inputs
        device = model_device(model)
        with evaluation_mode(model):
            chunks = [self.select(model(to_device(inputs[i:i + batch_size], device)))
                      for i in range(0, len(inputs), batch_size)]
        return to_device(torch.cat(chunks), inputs.device)

    def evaluate(self, model: nn.Module | None = None) -> float:
        """The task metric of ``model`` (default: the original) on the evaluation data, a finite
        float (a NaN or infinite value is a `WorkbenchError` naming the metric)."""
        return check_finite(self.metric(self.outputs(model), self.eval_targets), self.metric_name)
