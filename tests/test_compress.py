"""apply(model, plan): new model, original untouched, errors before anything is returned."""
import pytest
import torch

import workbench as wb
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.layers import LowRankConv2d, LowRankLinear
from workbench.measure import count_params, saved_bytes
from workbench.registry import get_recipe
from tests.conftest import state_bytes


def test_apply_returns_new_model_and_leaves_original_bytes_unchanged(mlp_task):
    before = state_bytes(mlp_task.model)
    plan = wb.Plan({"fc1": wb.LayerPlan("svd", {"rank": 8}), "fc2": wb.LayerPlan("svd", {"rank": 16})})
    small = wb.apply(mlp_task.model, plan)
    assert small is not mlp_task.model
    assert isinstance(small.fc1, LowRankLinear) and isinstance(small.fc2, LowRankLinear)
    assert isinstance(mlp_task.model.fc1, torch.nn.Linear)
    assert state_bytes(mlp_task.model) == before


def test_undo_is_applying_the_previous_plan(mlp_task):
    empty = wb.Plan()
    restored = wb.apply(mlp_task.model, empty)
    x = mlp_task.eval_inputs
    torch.testing.assert_close(restored(x), mlp_task.model(x), rtol=0, atol=0)


def test_full_rank_plan_reproduces_outputs(cnn_task):
    plan = wb.Plan({"conv2": wb.LayerPlan("svd", {"rank": 64}), "fc2": wb.LayerPlan("svd", {"rank": 10})})
    full = wb.apply(cnn_task.model, plan)
    assert isinstance(full.conv2, LowRankConv2d)
    x = cnn_task.eval_inputs[:50]
    torch.testing.assert_close(full(x), cnn_task.model(x), rtol=1e-4, atol=1e-4)


def test_ratio_half_keeps_half_the_parameters_and_bytes(mlp_task):
    plan = get_recipe("svd")(mlp_task.model, ratio=0.5)
    small = wb.apply(mlp_task.model, plan)
    param_ratio = count_params(small) / count_params(mlp_task.model)
    byte_ratio = saved_bytes(small) / saved_bytes(mlp_task.model)
    assert 0.45 <= param_ratio <= 0.55
    assert 0.45 <= byte_ratio <= 0.55


def test_layer_whose_rank_saves_nothing_stays_dense(mlp_task):
    plan = get_recipe("svd")(mlp_task.model, energy=1.0)  # full energy: every layer at full rank
    assert plan.layers == {}
    plan = get_recipe("svd")(mlp_task.model, ranks={"fc1": 60, "fc2": 8})  # 60*(320) > 256*64
    assert set(plan.layers) == {"fc2"}


def test_energy_rule_keeps_the_asked_energy(mlp_task):
    from workbench.spectra import model_spectra

    plan = get_recipe("svd")(mlp_task.model, energy=0.8)
    for spectrum in model_spectra(mlp_task.model):
        if spectrum.name in plan.layers:
            rank = plan.layers[spectrum.name]["rank"]
            assert spectrum.energy[rank - 1] >= 0.8 - 1e-6
            assert rank == 1 or spectrum.energy[rank - 2] < 0.8


@pytest.mark.parametrize("plan, error, message", [
    (wb.Plan({"fc9": wb.LayerPlan("svd", {"rank": 2})}), WorkbenchError, "unknown layer 'fc9'.*fc1"),
    (wb.Plan({"fc1": wb.LayerPlan("svd", {"rank": 0})}), WorkbenchError, "rank=0"),
    (wb.Plan({"fc1": wb.LayerPlan("svd", {"rank": 65})}), WorkbenchError, r"rank=65 is above min\(out, in\)=64"),
    (wb.Plan({"fc1": wb.LayerPlan("nope", {})}), WorkbenchError, "unknown method 'nope'"),
    (wb.Plan({"act1": wb.LayerPlan("svd", {"rank": 2})}), UnsupportedLayerError, "act1.*ReLU.*Linear, Conv2d"),
])
def test_bad_plans_raise_and_nothing_is_half_applied(mlp_task, plan, error, message):
    before = state_bytes(mlp_task.model)
    good_then_bad = wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": 4}), **plan.layers})
    with pytest.raises(error, match=message):
        wb.apply(mlp_task.model, good_then_bad)
    assert state_bytes(mlp_task.model) == before
    assert isinstance(mlp_task.model.fc2, torch.nn.Linear)


def test_recipe_refuses_out_of_range_options(mlp_task):
    recipe = get_recipe("svd")
    with pytest.raises(WorkbenchError, match=r"ratio=1.5 must be in \(0, 1\]"):
        recipe(mlp_task.model, ratio=1.5)
    with pytest.raises(WorkbenchError, match=r"energy=0 must be in \(0, 1\]"):
        recipe(mlp_task.model, energy=0)
    with pytest.raises(WorkbenchError, match="exactly one of ratio, energy or ranks"):
        recipe(mlp_task.model, ratio=0.5, energy=0.5)
    with pytest.raises(WorkbenchError, match="act1.*ReLU"):
        recipe(mlp_task.model, ranks={"act1": 2})
