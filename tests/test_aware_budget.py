"""Rank allocation under one parameter budget: brute-force oracle, budget, plans that apply."""
import itertools

import pytest
import torch

import workbench as wb
from workbench.kernels import svd as svd_kernels
from workbench.measure import count_params
from workbench.registry import get_recipe
from workbench.select.aware_budget import allocate_ranks, allocated_plan


def _loss(spectra, ranks, scales):
    return sum(scales[n] * float((s[ranks[n]:] ** 2).sum() / (s ** 2).sum()) for n, s in spectra.items())


def test_greedy_allocation_equals_brute_force_when_rank_costs_are_equal():
    # Every layer has m + n = 22, so the greedy over sorted singular values is exact.
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (12, 10), "b": (10, 12), "c": (11, 11)}
    spectra = {n: torch.sort(torch.rand(min(s), generator=g, dtype=torch.float64) ** k, descending=True).values
               for (n, s), k in zip(shapes.items(), (1, 3, 6))}
    scales = {"a": 1.0, "b": 2.5, "c": 0.7}
    ratio = 0.35
    ranks = allocate_ranks(spectra, shapes, ratio, scales)
    budget = ratio * sum(m * n for m, n in shapes.values())
    assert sum(ranks[n] * sum(shapes[n]) for n in shapes) <= budget
    caps = {n: svd_kernels.breakeven_rank(s) for n, s in shapes.items()}
    best = min(_loss(spectra, dict(zip(shapes, combo)), scales)
               for combo in itertools.product(*[range(1, caps[n] + 1) for n in shapes])
               if sum(r * sum(shapes[n]) for n, r in zip(shapes, combo)) <= budget)
    assert _loss(spectra, ranks, scales) == pytest.approx(best, rel=1e-12)


def test_ratio_below_the_rank_one_minimum_is_refused():
    with pytest.raises(wb.errors.WorkbenchError, match="ratio=0.01"):
        allocate_ranks({"a": torch.ones(4)}, {"a": (4, 4)}, 0.01)


@pytest.mark.parametrize("weigh", ["energy", "sensitivity", "measured"])
def test_allocated_plan_keeps_the_total_budget_and_applies(mlp_task, weigh):
    model, calib = mlp_task.model, mlp_task.calibration_inputs()
    plan = allocated_plan(model, calib, 0.3, weigh=weigh)
    new = wb.apply(model, plan, calibration_inputs=calib)
    names = ["fc1", "fc2", "fc3"]  # the budget covers every layer, dense ones included
    before = sum(count_params(model.get_submodule(n)) for n in names)
    after = sum(count_params(new.get_submodule(n)) for n in names)
    biases = sum(model.get_submodule(n).bias.numel() for n in names)
    assert after - biases <= 0.3 * (before - biases)
    uniform = get_recipe("svd")(model, ratio=0.3, activation_aware="whiten")
    assert {n: c["rank"] for n, c in plan.layers.items()} != {n: c["rank"] for n, c in uniform.layers.items()}
    assert mlp_task.evaluate(new) > mlp_task.evaluate(wb.apply(model, uniform, calibration_inputs=calib))


def test_measured_allocation_keeps_sensitive_layers_dense_and_beats_uniform(mlp_task):
    """With room to spare, measured losses keep the layers that matter dense (they are left out
    of the plan) rather than capping every layer at its breakeven rank."""
    model, calib = mlp_task.model, mlp_task.calibration_inputs()
    plan = allocated_plan(model, calib, 0.6)
    assert set(plan.layers) < {"fc1", "fc2", "fc3"}
    with pytest.raises(wb.errors.WorkbenchError, match="ratio=0.001 is below"):
        allocated_plan(model, calib, 0.001)


def test_unknown_layer_and_rule_are_refused(mlp_task):
    with pytest.raises(wb.errors.WorkbenchError, match="nope"):
        allocated_plan(mlp_task.model, mlp_task.calibration_inputs(), 0.5, layers=["nope"])
    with pytest.raises(wb.errors.WorkbenchError, match="weigh='magic' is not a rule; use 'measured'"):
        allocated_plan(mlp_task.model, mlp_task.calibration_inputs(), 0.5, weigh="magic")
