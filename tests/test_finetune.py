"""The fine-tuning loop: trains only what compression left trainable, keeps the result compressed,
stops early on a validation split held out of the training split, cancels without loss, refuses
bad input."""
import copy
import dataclasses
import json
import threading

import pytest
import torch
from torch import nn

import workbench as wb
from conftest import state_bytes
from workbench.errors import WorkbenchError
from workbench.layers.lowrank import LowRankLinear
from workbench.measure import count_params
from workbench.recovery import finetune, validation_split
from workbench.recovery.finetune import fit_and_validation
from workbench.recovery.views import MaskedLayer, repack, trainable


@pytest.fixture(scope="module")
def svd_small(mlp_task):
    return wb.apply(mlp_task.model, wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": 4}),
                                             "fc1": wb.LayerPlan("svd", {"rank": 8})}))


def test_validation_split_partitions_the_training_split(mlp_task):
    x, y = mlp_task.train_inputs, mlp_task.train_targets
    x_fit, y_fit, x_val, y_val = validation_split(x, y, 0.2, seed=3)
    assert len(x_val) == round(0.2 * len(x)) and len(x_fit) + len(x_val) == len(x)
    rows = {tuple(r.tolist()) + (int(l),) for r, l in zip(x, y)}
    assert {tuple(r.tolist()) + (int(l),) for r, l in zip(torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val]))} == rows
    again = validation_split(x, y, 0.2, seed=3)
    assert torch.equal(again[2], x_val)  # seeded


def test_early_stopping_judges_the_held_out_split_where_the_task_has_one(mlp_task):
    x_fit, y_fit, x_val, y_val = fit_and_validation(mlp_task, 0.2, seed=3)
    assert x_fit is mlp_task.train_inputs and y_fit is mlp_task.train_targets
    assert x_val is mlp_task.val_inputs and y_val is mlp_task.val_targets
    without = dataclasses.replace(mlp_task, val_inputs=None, val_targets=None)
    held_out = fit_and_validation(without, 0.2, seed=3)
    expected = validation_split(mlp_task.train_inputs, mlp_task.train_targets, 0.2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(held_out, expected))


def test_finetune_recovers_factors_only_and_leaves_the_input_alone(mlp_task, svd_small):
    before = state_bytes(svd_small)
    result = finetune(svd_small, mlp_task, epochs=8, progress=False)
    assert state_bytes(svd_small) == before
    assert result.model is not svd_small and not result.cancelled
    assert isinstance(result.model.fc2, LowRankLinear) and result.model.fc2.rank == 4
    assert count_params(result.model) == count_params(svd_small)  # still factorized, same size
    assert mlp_task.evaluate(result.model) > mlp_task.evaluate(svd_small) + 0.05
    assert [h["epoch"] for h in result.history] == list(range(1, len(result.history) + 1))
    assert set(result.history[0]) >= {"loss", "val_loss", "metric"}
    json.dumps(result.history_dict())


def test_frozen_parameters_stay_frozen(mlp_task, svd_small):
    model = copy.deepcopy(svd_small)
    model.fc3.weight.requires_grad_(False)
    result = finetune(model, mlp_task, epochs=2, progress=False, patience=None)
    assert torch.equal(result.model.fc3.weight, model.fc3.weight)
    assert not torch.equal(result.model.fc2.first.weight, model.fc2.first.weight)


def test_masked_layer_keeps_pruned_weights_at_exactly_zero(mlp_task):
    model = copy.deepcopy(mlp_task.model)
    w = model.fc2.weight.detach().clone()
    mask = w.abs() > w.abs().flatten().kthvalue(int(0.97 * w.numel())).values  # keep the top 3%
    with torch.no_grad():
        model.fc2.weight.mul_(mask)
    model.fc2 = MaskedLayer(model.fc2, mask)
    result = finetune(model, mlp_task, epochs=3, lr=5e-3, progress=False, patience=None)
    trained = result.model.fc2
    assert result.best_epoch > 0
    assert isinstance(trained, nn.Linear)  # re-packed (no pack given: dense with exact zeros)
    assert torch.count_nonzero(trained.weight[~mask]) == 0
    assert not torch.equal(trained.weight[mask], w[mask])  # kept weights did train


def test_cancel_before_start_returns_the_input_model_unchanged(mlp_task, svd_small):
    before = state_bytes(svd_small)
    stop = threading.Event()
    stop.set()
    result = finetune(svd_small, mlp_task, epochs=5, cancel=stop, progress=False)
    assert result.cancelled and result.model is svd_small and result.history == []
    assert state_bytes(svd_small) == before


def test_cancel_from_the_epoch_callback_after_two_epochs(mlp_task, svd_small):
    before = state_bytes(svd_small)
    result = finetune(svd_small, mlp_task, epochs=10, progress=False,
                      on_epoch=lambda entry: entry["epoch"] < 2)
    assert result.cancelled and len(result.history) == 2
    assert result.model is svd_small and state_bytes(svd_small) == before


def test_cancel_callable_is_checked_between_batches(mlp_task, svd_small):
    calls = []
    result = finetune(svd_small, mlp_task, epochs=3, progress=False,
                      cancel=lambda: calls.append(1) or len(calls) > 5)
    assert result.cancelled and result.history == [] and result.model is svd_small


def test_early_stopping_keeps_the_best_validation_epoch(mlp_task, svd_small):
    result = finetune(svd_small, mlp_task, epochs=30, lr=0.05, patience=2, progress=False)
    assert result.stopped_early and len(result.history) < 30
    metrics = [result.start["metric"]] + [h["metric"] for h in result.history]
    assert result.best_epoch == max(range(len(metrics)), key=lambda i: (metrics[i], -(
        [result.start["val_loss"]] + [h["val_loss"] for h in result.history])[i]))
    x_val, y_val = mlp_task.val_inputs, mlp_task.val_targets  # the held-out split, never trained on
    with torch.no_grad():
        kept = mlp_task.metric(result.model(x_val), y_val)
    assert kept == pytest.approx(metrics[result.best_epoch])


def test_same_seed_same_history(mlp_task, svd_small):
    a = finetune(svd_small, mlp_task, epochs=2, progress=False, patience=None)
    b = finetune(svd_small, mlp_task, epochs=2, progress=False, patience=None)
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_views_round_trip_is_identity_for_dense_and_lowrank(svd_small):
    model = copy.deepcopy(svd_small)
    assert state_bytes(repack(trainable(model))) == state_bytes(svd_small)


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, r"epochs=0 must be a positive integer"),
    ({"epochs": -3}, r"epochs=-3 must be a positive integer"),
    ({"epochs": 2.5}, r"epochs=2.5 must be a positive integer"),
    ({"epochs": 2, "lr": 0}, r"lr=0 must be a finite number > 0"),
    ({"epochs": 2, "val_fraction": 0.9}, r"val_fraction=0.9 must be in \(0, 0.5\]"),
    ({"epochs": 2, "patience": 0}, r"patience=0 must be a positive integer or None"),
    ({"epochs": 2, "batch_size": 0}, r"batch_size=0 must be a positive integer"),
])
def test_bad_input_is_refused(mlp_task, kwargs, message):
    with pytest.raises(WorkbenchError, match=message):
        finetune(mlp_task.model, mlp_task, progress=False, **kwargs)


def test_a_task_without_training_split_is_refused(mlp_task):
    task = copy.copy(mlp_task)
    task.train_inputs = None
    with pytest.raises(WorkbenchError, match="no training split"):
        finetune(mlp_task.model, task, epochs=1, progress=False)


def test_finetuning_a_sparse_layer_keeps_it_sparse_stored(mlp_task):
    from workbench.kernels.prune import mask_by_ratio
    from workbench.layers.sparse import SparseLinear

    model = copy.deepcopy(mlp_task.model)
    mask = mask_by_ratio(model.fc2.weight, 0.03)  # 97% sparsity: accuracy drops, so training helps
    model.fc2 = SparseLinear.from_linear(model.fc2, mask)
    before = state_bytes(model)
    result = finetune(model, mlp_task, epochs=3, lr=5e-3, progress=False, patience=None)
    assert state_bytes(model) == before
    trained = result.model.fc2
    assert isinstance(trained, SparseLinear) and trained.format == model.fc2.format
    assert torch.equal(trained.mask(), mask) and trained.kept() == int(mask.sum())
    assert count_params(result.model) == count_params(model)
    assert not torch.equal(trained.values, model.fc2.values)  # kept values trained
    assert mlp_task.evaluate(result.model) > mlp_task.evaluate(model)


def test_sparse_conv_layers_stay_sparse_after_finetuning(cnn_task):
    from workbench.layers.sparse import SparseConv2d
    from workbench.registry import get_recipe

    pruned = wb.apply(cnn_task.model, get_recipe("prune")(cnn_task.model, ratio=0.1, layers=["conv2"]))
    result = finetune(pruned, cnn_task, epochs=1, progress=False, patience=None)
    conv = result.model.conv2
    assert isinstance(conv, SparseConv2d) and torch.equal(conv.mask(), pruned.conv2.mask())
    assert count_params(result.model) == count_params(pruned)


def test_cli_finetune_history_and_the_saved_model_loads_back(capsys, tmp_path, mlp_task):
    from workbench.cli import main
    from workbench.export import load_compressed

    out = tmp_path / "pruned.safetensors"
    assert main(["compress", "digits-mlp", "--method", "prune", "--ratio", "0.2", "--finetune", "2",
                 "--distill", "--temperature", "3", "--alpha", "0.5", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    history = result["history"]
    assert history["kind"] == "distill" and history["temperature"] == 3.0 and history["alpha"] == 0.5
    assert len(history["loss"]) == len(history["metric"]) == len(history["epoch"]) <= 2
    model, _, _ = load_compressed(out)
    assert type(model.fc2).__name__ == "SparseLinear"
    assert mlp_task.evaluate(model) == pytest.approx(result["after"]["metric"])
    assert result["after"]["params"] < 0.25 * result["before"]["params"]
