"""Budgeted allocation: brute-force oracle for the knapsack, budgets respected, beats uniform, errors."""
import itertools
import json

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.select import _allocate as alloc
from workbench.select._allocate import OptionTable
from conftest import state_bytes


def random_table(seed: int, layers: int = 4, options: int = 4) -> OptionTable:
    rng = np.random.default_rng(seed)
    costs, losses = [], []
    for _ in range(layers):
        c = np.sort(rng.integers(5, 100, options))[::-1].astype(float)
        l = np.sort(rng.random(options))
        l[0] = 0.0
        costs.append(c)
        losses.append(l)
    return OptionTable([f"l{i}" for i in range(layers)], [[None] * options] * layers, costs, losses,
                       fixed=10.0, total=10.0 + sum(c[0] for c in costs))


def brute_force(table: OptionTable, limit: float) -> float:
    best = np.inf
    for picks in itertools.product(*[range(len(c)) for c in table.costs]):
        if table.cost_of(picks) <= limit:
            best = min(best, table.loss_of(picks))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_milp_is_optimal_and_heuristics_feasible(seed):
    table = random_table(seed)
    limit = table.fixed + 0.5 * sum(c[0] for c in table.costs)
    picks, how = alloc.convex_picks(table, limit, solver="milp")
    assert how.startswith("milp")
    assert table.cost_of(picks) <= limit + 1e-9
    assert table.loss_of(picks) == pytest.approx(brute_force(table, limit), abs=1e-9)
    for other in (alloc.convex_picks(table, limit, solver="lp")[0], alloc.greedy_picks(table, limit)):
        assert table.cost_of(other) <= limit + 1e-9
        assert table.loss_of(other) >= table.loss_of(picks) - 1e-9


@pytest.fixture(scope="module")
def mlp_allocations(mlp_task):
    return alloc.compare_allocators(mlp_task, 0.3, "params", progress=False)


def test_budget_respected_and_best_beats_uniform(mlp_task, mlp_allocations):
    for name, result in mlp_allocations.items():
        assert result.used <= result.limit, name
        assert result.params == wb.measure(wb.apply(mlp_task.model, result.plan), mlp_task, latency=False)["params"]
    best = max(r.metric for n, r in mlp_allocations.items() if n != "uniform")
    assert best > mlp_allocations["uniform"].metric + 0.1


def test_measured_metric_is_the_plan_on_test(mlp_task, mlp_allocations):
    result = mlp_allocations["greedy"]
    assert result.metric == pytest.approx(mlp_task.evaluate(wb.apply(mlp_task.model, result.plan)))
    ranks = result.ranks
    assert set(ranks) == {"fc1", "fc2", "fc3"}
    data = result.to_dict()
    assert json.loads(json.dumps(data))["ranks"] == {k: v for k, v in ranks.items()}


@pytest.mark.parametrize("by", ["bytes", "flops"])
def test_other_budgets(cnn_task, by):
    before = state_bytes(cnn_task.model)
    result = alloc.allocate(cnn_task, 0.4, by, "convex", progress=False)
    assert result.used <= result.limit
    assert result.metric > 0.8
    assert state_bytes(cnn_task.model) == before


def test_proxy_loss_is_relative_output_error(mlp_task):
    from workbench.hooks import collect_layer_inputs
    from workbench.select._sensitivity import sensitivity

    result = sensitivity(mlp_task, "svd", (0.1,), layers=["fc2"], progress=False)
    proxy = alloc.proxy_losses(mlp_task, result)[0][0]
    rank = result.choices[0][0]["rank"]
    x = collect_layer_inputs(mlp_task.model, ["fc2"], mlp_task.calibration_inputs(512))["fc2"].double()
    w = mlp_task.model.fc2.weight.detach().double()
    u, s, vh = torch.linalg.svd(w)
    w_r = (u[:, :rank] * s[:rank]) @ vh[:rank]
    expected = ((x @ (w - w_r).T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert proxy == pytest.approx(float(expected), rel=1e-4)
    chosen = alloc.allocate(mlp_task, 0.3, "params", "convex", loss="proxy", progress=False)
    assert chosen.used <= chosen.limit


def test_infeasible_budget_names_the_smallest_size(mlp_task):
    before = state_bytes(mlp_task.model)
    for allocator in ("greedy", "uniform"):
        with pytest.raises(WorkbenchError, match=r"below the smallest model .* use a budget of at least"):
            alloc.allocate(mlp_task, 0.001, "params", allocator, progress=False)
    assert state_bytes(mlp_task.model) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "budget=0"), ({"budget": 1.5}, "budget=1.5"), ({"by": "watts"}, "by='watts'"),
    ({"allocator": "magic"}, "allocator='magic'"), ({"allocator": "convex", "solver": "x"}, "solver='x'"),
])
def test_bad_input(mlp_task, kwargs, message):
    options = {"budget": 0.3, "by": "params", "allocator": "greedy", **kwargs}
    with pytest.raises(WorkbenchError, match=message):
        alloc.allocate(mlp_task, progress=False, **options)


def test_cli_allocate_json(capfd, mlp_allocations):
    from workbench.cli import main

    assert main(["allocate", "digits-mlp", "--budget", "0.3", "--allocator", "convex", "--json"]) == 0
    data = json.loads(capfd.readouterr().out)  # HiGHS' native banner must not leak into stdout
    assert data["used"] <= data["limit"] and set(data["ranks"]) == {"fc1", "fc2", "fc3"}
    assert data["metric"] > 0.9
    assert main(["allocate", "digits-mlp", "--budget", "0.001"]) == 2
    assert "smallest model" in capfd.readouterr().err
