"""`Task`: a model together with the data and metric it is judged by."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

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

    @property
    def example_input(self) -> torch.Tensor:
        """One evaluation sample with its batch dimension: ``(1, ...)``."""
        return self.eval_inputs[:1]

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
