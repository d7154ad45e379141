"""L1-regularised training and iterative (AGP) pruning on the digits MLP."""
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.layers.sparse import SparseLinear
from workbench.recovery.pruning_train import iterative_pruning, l1_regularised_pruning

from conftest import state_bytes


def test_l1_training_shrinks_weights_towards_zero(mlp_task):
    before = state_bytes(mlp_task.model)
    plain = l1_regularised_pruning(mlp_task, l1=0.0, epochs=1, threshold=0.02)
    sparse = l1_regularised_pruning(mlp_task, l1=3e-4, epochs=1, threshold=0.02)
    assert sparse.history[0]["kept"] < plain.history[0]["kept"]
    assert state_bytes(mlp_task.model) == before


def test_iterative_pruning_reaches_the_target_and_keeps_the_mask(mlp_task):
    run = iterative_pruning(mlp_task, ratio=0.1, steps=3, epochs_per_step=1)
    assert [round(h["kept"], 4) for h in run.history][-1] == 0.1
    assert run.history[0]["kept"] > run.history[1]["kept"] > 0.1
    layers = [m for m in run.pruned.modules() if isinstance(m, SparseLinear)]
    kept = sum(m.kept() for m in layers) / sum(m.weight_shape[0] * m.weight_shape[1] for m in layers)
    assert kept == pytest.approx(0.1, abs=0.005)
    assert mlp_task.evaluate(run.pruned) > 0.85
    torch.testing.assert_close(run.pruned(mlp_task.eval_inputs[:8]), run.model(mlp_task.eval_inputs[:8]))


def test_iterative_pruning_refuses_bad_ratio(mlp_task):
    with pytest.raises(WorkbenchError, match="ratio=0 must be in"):
        iterative_pruning(mlp_task, ratio=0)
