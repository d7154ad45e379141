"""The prune / quant / int8 recipes end to end: real shrinkage, identical structured outputs,
bad input refused with nothing applied, the user's model untouched."""
import copy

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.layers.quantized import Int8Linear, QuantLinear
from workbench.layers.sparse import SparseLinear
from workbench.measure import count_params, saved_bytes
from workbench.methods.pruning import structured_removals
from workbench.registry import get_recipe

from conftest import state_bytes


def masked_copy(model, removals):
    """The model with the removed neurons' rows (weights and bias) set to zero."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, rows in removals.items():
            layer = masked.get_submodule(name)
            layer.weight[rows] = 0
            layer.bias[rows] = 0
    return masked


@pytest.mark.parametrize("task_name", ["mlp_task", "cnn_task"])
def test_structured_pruning_shrinks_tensors_and_matches_the_masked_model(task_name, request):
    task = request.getfixturevalue(task_name)
    before = state_bytes(task.model)
    plan = get_recipe("prune")(task.model, task=task, ratio=0.5, structured=True)
    pruned = wb.apply(task.model, plan)
    step = plan.steps[0]
    assert step.method == "prune_groups"  # no coupling here: one group per layer, the plan records its rows
    removals = {root: list(rows) for root, rows in zip(step["roots"], step["removed"])}
    assert sorted(removals) == sorted(structured_removals(task.model, 0.5, step["roots"]))
    for name, rows in removals.items():
        original, small = task.model.get_submodule(name), pruned.get_submodule(name)
        assert small.weight.shape[0] == original.weight.shape[0] - len(rows) > 0
    # the next layer lost the matching inputs
    head = "fc2" if task_name == "cnn_task" else "fc3"
    assert pruned.get_submodule(head).weight.shape[1] < task.model.get_submodule(head).weight.shape[1]
    assert count_params(pruned) < 0.6 * count_params(task.model)
    x = task.eval_inputs[:64]
    with torch.no_grad():
        # same neurons zeroed: equal up to float summation order (fewer terms in each dot product)
        torch.testing.assert_close(pruned(x), masked_copy(task.model, removals)(x), rtol=0, atol=1e-5)
        assert pruned(x).argmax(1).equal(masked_copy(task.model, removals)(x).argmax(1))
        # in float64 the only difference left is rounding at 1e-16
        torch.testing.assert_close(copy.deepcopy(pruned).double()(x.double()),
                                   masked_copy(task.model, removals).double()(x.double()), rtol=0, atol=1e-12)
    assert state_bytes(task.model) == before
    assert plan == wb.Plan.from_json(plan.to_json())


def test_structured_refuses_the_output_layer_and_bad_ratio(mlp_task):
    recipe = get_recipe("prune")
    with pytest.raises(WorkbenchError, match="produces the model's outputs"):
        recipe(mlp_task.model, task=mlp_task, ratio=0.5, structured=True, layers=["fc3"])
    with pytest.raises(WorkbenchError, match="ratio=0 must be in"):
        recipe(mlp_task.model, task=mlp_task, ratio=0, structured=True)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_pruning_keeps_the_fraction_and_saves_bytes(mlp_task, scope):
    before = state_bytes(mlp_task.model)
    plan = get_recipe("prune")(mlp_task.model, ratio=0.2, scope=scope)
    pruned = wb.apply(mlp_task.model, plan)
    sparse = [m for m in pruned.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 3
    kept = sum(m.kept() for m in sparse)
    assert kept == pytest.approx(0.2 * sum(m.weight.numel() for m in mlp_task.model.modules()
                                           if isinstance(m, nn.Linear)), rel=0.01)
    assert saved_bytes(pruned) < 0.3 * saved_bytes(mlp_task.model)
    assert mlp_task.evaluate(pruned) > 0.8
    assert state_bytes(mlp_task.model) == before


def test_bad_prune_input_names_the_value_and_the_rule(mlp_task):
    recipe = get_recipe("prune")
    for ratio in (0, 1.01, -1):
        with pytest.raises(WorkbenchError, match=f"ratio={ratio} must be in \\(0, 1\\]"):
            recipe(mlp_task.model, ratio=ratio)
    with pytest.raises(WorkbenchError, match="prunes every weight of layer 'fc1'"):
        recipe(mlp_task.model, threshold=100.0)
    with pytest.raises(UnsupportedLayerError, match="'act1' of type ReLU"):
        recipe(mlp_task.model, ratio=0.5, layers=["act1"])
    # a plan that empties one layer out of three: apply fails, nothing is returned half done
    plan = wb.Plan({"fc1": wb.LayerPlan("prune", {"ratio": 0.5}),
                    "fc2": wb.LayerPlan("prune", {"threshold": 1e9})})
    before = state_bytes(mlp_task.model)
    with pytest.raises(WorkbenchError, match="prunes every weight of layer 'fc2'"):
        wb.apply(mlp_task.model, plan)
    assert state_bytes(mlp_task.model) == before
    with pytest.raises(UnsupportedLayerError, match="cannot compress layer 'act1'"):
        wb.apply(mlp_task.model, wb.Plan({"act1": wb.LayerPlan("prune", {"ratio": 0.5})}))


@pytest.mark.parametrize("scheme", ["uniform", "kmeans"])
def test_four_bit_model_is_a_fifth_of_the_bytes_and_still_accurate(mlp_task, scheme):
    before = state_bytes(mlp_task.model)
    plan = get_recipe("quant")(mlp_task.model, bits=4, scheme=scheme)
    quantized = wb.apply(mlp_task.model, plan)
    assert all(isinstance(quantized.get_submodule(n), QuantLinear) for n in ("fc1", "fc2", "fc3"))
    assert saved_bytes(quantized) <= 0.2 * saved_bytes(mlp_task.model)
    assert mlp_task.evaluate(quantized) > mlp_task.evaluate() - 0.03
    assert state_bytes(mlp_task.model) == before


def test_quant_bad_input_and_no_op_bits(mlp_task):
    recipe = get_recipe("quant")
    for bits in (0, 9, 12):
        with pytest.raises(WorkbenchError, match=f"bits={bits} is outside 1..8"):
            recipe(mlp_task.model, bits=bits)
    with pytest.raises(WorkbenchError, match="scheme='lloyd'"):
        recipe(mlp_task.model, bits=4, scheme="lloyd")
    assert recipe(mlp_task.model, bits=32).layers == {}
    same = wb.apply(mlp_task.model, wb.Plan({"fc1": wb.LayerPlan("quant", {"bits": 16})}))
    assert isinstance(same.fc1, nn.Linear)
    with pytest.raises(UnsupportedLayerError, match="'act1' of type ReLU"):
        recipe(mlp_task.model, bits=4, layers=["act1"])


def test_int8_recipe_swaps_linears_and_saves_bytes(cnn_task):
    plan = get_recipe("int8")(cnn_task.model)
    assert sorted(plan.layers) == ["fc1", "fc2"]  # convs stay float (no dynamic int8 conv kernel)
    model = wb.apply(cnn_task.model, plan)
    assert isinstance(model.fc1, Int8Linear)
    assert cnn_task.evaluate(model) >= cnn_task.evaluate() - 0.01
    assert saved_bytes(model) < saved_bytes(cnn_task.model)


def test_cli_report_states_sparse_latency(mlp_task):
    from workbench.methods.pruning import pruning_report
    pruned = wb.apply(mlp_task.model, get_recipe("prune")(mlp_task.model, ratio=0.2))
    report = pruning_report(mlp_task.model, pruned, mlp_task)
    assert [row["name"] for row in report["sparse_latency"]] == ["fc1", "fc2", "fc3"]
    assert any("SLOWER" in note or "faster" in note for note in report["notes"])
