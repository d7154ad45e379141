"""Per-layer sensitivity: oracles against applying each single-layer plan, costs, cache, bad input."""
import dataclasses

import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError

from workbench.select import _sensitivity as sens
from conftest import state_bytes

GRID = (0.05, 0.3, 0.9)


@pytest.fixture(scope="module")
def mlp_result(mlp_task):
    return sens.sensitivity(mlp_task, "svd", GRID, progress=False)


def test_metric_is_the_single_layer_plan_scored_on_validation(mlp_task, mlp_result):
    scored = sens.selection_task(mlp_task, "validation")
    for i, layer in enumerate(mlp_result.layers):
        for j in range(len(GRID)):
            plan = sens.single_layer_plan(mlp_result, layer, j)
            expected = scored.evaluate(wb.apply(mlp_task.model, plan))
            assert mlp_result.metric[i][j] == pytest.approx(expected)
    assert mlp_result.baseline == pytest.approx(scored.evaluate(mlp_task.model))


def test_costs_are_factor_sizes(mlp_task, mlp_result):
    for i, layer in enumerate(mlp_result.layers):
        module = mlp_task.model.get_submodule(layer)
        m, n = module.weight.shape
        assert mlp_result.dense["params"][i] == m * n + m
        for j, choice in enumerate(mlp_result.choices[i]):
            expected = m * n + m if choice is None else choice["rank"] * (m + n) + m
            assert mlp_result.costs["params"][i][j] == expected
            assert mlp_result.costs["bytes"][i][j] == 4 * expected
    assert sum(mlp_result.dense["params"]) + mlp_result.fixed["params"] == mlp_result.total["params"]


def test_smaller_rank_never_helps_much_and_fc3_is_most_sensitive(mlp_result):
    drops = {layer: mlp_result.baseline - mlp_result.curve(layer)[0] for layer in mlp_result.layers}
    # fc3 (10 classes) at rank 1 loses most; fc2 (256x256, low effective rank) least
    assert max(drops, key=drops.get) == "fc3"
    assert drops["fc3"] > 0.5


def test_validation_split_is_the_held_out_one(mlp_task):
    val = sens.selection_task(mlp_task, "validation")
    assert torch.equal(val.eval_inputs, mlp_task.val_inputs) and torch.equal(val.eval_targets, mlp_task.val_targets)
    train_rows = {tuple(r.tolist()) for r in mlp_task.train_inputs}
    assert sum(tuple(r.tolist()) in train_rows for r in val.eval_inputs) < 5  # never trained on
    assert val.evaluate() < 1.0  # a held-out baseline, not the training accuracy
    assert sens.selection_task(mlp_task, "test") is mlp_task


def test_validation_split_is_sampled_from_train_without_a_held_out_one(mlp_task):
    task = dataclasses.replace(mlp_task, val_inputs=None, val_targets=None)
    val = sens.selection_task(task, "validation", n=100)
    train_rows = {tuple(r.tolist()) for r in task.train_inputs}
    assert len(val.eval_inputs) == 100 and all(tuple(r.tolist()) in train_rows for r in val.eval_inputs)
    with pytest.raises(WorkbenchError, match="no validation or training split"):
        sens.selection_task(dataclasses.replace(task, train_inputs=None, train_targets=None), "validation")


def test_cached_and_model_untouched(mlp_task, mlp_result, tmp_path):
    before = state_bytes(mlp_task.model)
    assert sens.sensitivity(mlp_task, "svd", GRID, progress=False) is mlp_result
    sens.clear_cache()
    fresh = sens.sensitivity(mlp_task, "svd", (0.1,), layers=["fc3"], cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("sensitivity-*.json"))
    assert len(files) == 1
    sens.clear_cache()
    again = sens.sensitivity(mlp_task, "svd", (0.1,), layers=["fc3"], cache_dir=tmp_path, progress=False)
    assert again.to_dict() == fresh.to_dict()
    assert state_bytes(mlp_task.model) == before


def test_frame_and_conv(cnn_task):
    result = sens.sensitivity(cnn_task, "svd", (0.2,), layers=["conv2"], progress=False)
    frame = result.to_frame()
    assert list(frame["layer"]) == ["conv2"] and frame["flops"][0] < result.dense["flops"][0]


@pytest.mark.parametrize("grid, message", [((), "grid is empty"), ((0.0,), "ratio=0.0"), ((1.5,), "ratio=1.5")])
def test_bad_grid(mlp_task, grid, message):
    with pytest.raises(WorkbenchError, match=message):
        sens.sensitivity(mlp_task, "svd", grid, progress=False)


def test_unknown_method_and_split(mlp_task):
    with pytest.raises(WorkbenchError, match="unknown method"):
        sens.sensitivity(mlp_task, "nope", (0.5,), progress=False)
    with pytest.raises(WorkbenchError, match="split="):
        sens.selection_task(mlp_task, "train")


def test_other_registered_recipes_give_curves(mlp_task):
    from workbench.registry import recipes

    for method, grid in (("prune", (0.5,)), ("quant", (4,))):
        if method not in recipes():
            continue
        result = sens.sensitivity(mlp_task, method, grid, layers=["fc2"], progress=False)
        assert 0 <= result.metric[0][0] <= 1
        assert result.costs["bytes"][0][0] < result.dense["bytes"][0]
