"""`Task`: a model together with the data and metric it is judged by."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from workbench.errors import WorkbenchError

Metric = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass
class Task:
    """A model with its evaluation data and metric.

    Attributes
    ----------
    name : the model's name (``"digits-mlp"``, ``"minilm"``, or the user's).
    model : the original model, in eval mode. The workbench never modifies it.
    eval_inputs : ``(n, ...)`` evaluation inputs (the test split for the digits models).
    eval_targets : labels ``(n,)``, or reference outputs when the metric is output fidelity.
    metric : ``metric(outputs, targets) -> float``, higher is better.
    metric_name : what ``metric`` measures (``"accuracy"``).
    train_inputs, train_targets : training split where there is one (fine-tuning, calibration).
    description : one line for listings.
    live_subset : evaluation samples the live tools use by default (`workbench.engine.Engine`,
        ``bench latency``) where a full evaluation is too slow for a slider move; None = all.
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
        """Up to ``n`` inputs for data-aware methods, drawn from training data, never the test split."""
        source = self.train_inputs if self.train_inputs is not None else self.eval_inputs
        return source[:n]

    @torch.no_grad()
    def outputs(self, model: nn.Module | None = None, batch_size: int = 4096) -> torch.Tensor:
        """Outputs of ``model`` (default: the original) on the evaluation inputs."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        try:
            chunks = [model(self.eval_inputs[i:i + batch_size])
                      for i in range(0, len(self.eval_inputs), batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(chunks)

    def evaluate(self, model: nn.Module | None = None) -> float:
        """The task metric of ``model`` (default: the original) on the evaluation data."""
        return self.metric(self.outputs(model), self.eval_targets)
