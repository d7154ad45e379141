"""`BudgetExplorer` (workbench/widgets/budget.py), headless and synchronous: every slider move re-solves the
knapsack on the built menu and evaluates the pick for real."""
import itertools

import numpy as np
import pytest

import workbench as wb
from workbench.engine import Engine
from workbench.engine.sizing import state_bytes as payload_bytes
from workbench.errors import WorkbenchError
from workbench.select import build_menu, menu_table
from conftest import state_bytes

FAMILIES = ("quant", "gptq", "svd", "prune")


@pytest.fixture(scope="module")
def snapshot(mlp_task):
    return state_bytes(mlp_task.model)


@pytest.fixture(scope="module")
def engine(mlp_task):
    return Engine(mlp_task, preview=False, freeze_gc=False)


@pytest.fixture(scope="module")
def explorer(mlp_task, engine, snapshot):
    return wb.BudgetExplorer(mlp_task, families=FAMILIES, budget=0.3, engine=engine, synchronous=True,
                             progress=False)


def shown(explorer):
    return ({key: r.value for key, r in explorer.readouts.items()}, explorer.table.value, explorer.view.widget.value)


def brute_force_loss(table, limit):
    """The least predicted loss over every combination of options within ``limit`` (the MCK oracle)."""
    best = np.inf
    for picks in itertools.product(*(range(len(c)) for c in table.costs)):
        if table.cost_of(picks) <= limit + 1e-9:
            best = min(best, table.loss_of(picks))
    return best


def test_moving_the_slider_changes_plan_readouts_and_figure(explorer):
    explorer.set_budget(0.3)
    plan, (readouts, table, image) = explorer.plan, shown(explorer)
    state = explorer.set_budget(0.07)
    assert state["budget"] == pytest.approx(0.07) and explorer.error.value == ""
    assert explorer.plan != plan
    new_readouts, new_table, new_image = shown(explorer)
    assert all(new_readouts[k] != readouts[k] for k in ("fraction", "bytes"))
    assert new_table != table and new_image != image and new_image[:4] == b"\x89PNG"
    marker = explorer.artists["pick"].get_data()
    assert list(marker[0]) == [state["allocation"].fraction_used]
    assert list(marker[1]) == [state["allocation"].metric]
    # the menu was built once: every move re-solves on the same one
    assert explorer.coalescer.computed[-1] == {"budget": 0.07}


@pytest.mark.parametrize("budget", [0.07, 0.15, 0.4])
def test_pick_is_within_budget_optimal_and_measured_for_real(mlp_task, explorer, budget):
    allocation = explorer.set_budget(budget)["allocation"]
    total = explorer.menu.total["bytes"]
    assert allocation.bytes <= budget * total
    applied = wb.apply(mlp_task.model, explorer.plan, calibration_inputs=mlp_task.calibration_inputs())
    assert payload_bytes(applied) == allocation.bytes
    assert mlp_task.evaluate(applied) == pytest.approx(allocation.metric, abs=1e-6)
    table, _ = menu_table(explorer.menu, "bytes", FAMILIES)
    # HiGHS does not separate objectives closer than its tolerances (~1e-7; 8-bit codes' errors are ~1e-7)
    assert allocation.predicted_loss == pytest.approx(brute_force_loss(table, budget * total + table.fixed),
                                                      abs=1e-7)
    counts = explorer.readouts["families"].value
    for family in {c["family"] for c in allocation.choices.values()}:
        assert family in counts


def test_budget_below_the_smallest_model_keeps_the_last_pick(explorer):
    explorer.set_budget(0.2)
    plan, before, state = explorer.plan, shown(explorer), explorer.state
    explorer.set_budget(0.03)
    assert "below the smallest model" in explorer.error.value
    assert f"{explorer.floor:.3f}" in explorer.error.value and "still showing the pick for budget=0.200" in explorer.error.value
    assert "Traceback" not in explorer.error.value
    assert explorer.plan == plan and shown(explorer) == before and explorer.state is state
    explorer.set_budget(0.1)
    assert explorer.error.value == "" and explorer.state["budget"] == pytest.approx(0.1)


def test_chart_has_every_family_and_the_joint_front(explorer):
    assert set(explorer.artists["lines"]) == {*FAMILIES, "joint"}
    assert explorer.floor == pytest.approx(explorer.fronts.arrays("joint")[0][0], abs=0.01)


def test_pins_are_kept_and_bad_input_refused(mlp_task, engine):
    pinned = wb.BudgetExplorer(mlp_task, families=("quant", "svd"), budget=0.2, pinned={"fc3": "dense"},
                               engine=engine, synchronous=True, progress=False, front_budgets=(0.5,))
    assert pinned.state["allocation"].choices["fc3"]["method"] == "dense"
    assert "fc3" not in pinned.plan.layers
    with pytest.raises(WorkbenchError, match="budget=1.5"):
        wb.BudgetExplorer(mlp_task, families=("quant",), budget=1.5, engine=engine, progress=False)
    with pytest.raises(WorkbenchError, match="'nope'"):
        wb.BudgetExplorer(mlp_task, families=("quant",), pinned={"nope": "dense"}, engine=engine, progress=False)


def test_a_menu_built_apart_on_some_layers_is_only_re_solved(mlp_task, engine):
    menu = build_menu(mlp_task, ("quant", "svd"), layers=["fc1", "fc2"], engine=engine)
    given = wb.BudgetExplorer(mlp_task, families=("quant", "svd"), budget=0.3, relative_to="layers", engine=engine,
                              menu=menu, synchronous=True, progress=False, front_budgets=(0.3,))
    assert given.menu is menu and set(given.state["allocation"].choices) == {"fc1", "fc2"}
    assert "fc3" not in given.plan.layers
    assert given.state["allocation"].fraction_used <= 0.3
    again = wb.joint_allocate(mlp_task, 0.3, "bytes", ("quant", "svd"), relative_to="layers", layers=["fc1", "fc2"],
                              engine=engine)
    assert given.plan == again.as_plan()                   # the same pick as a menu built on the spot
    with pytest.raises(WorkbenchError, match="needs the engine it was built on"):
        wb.BudgetExplorer(mlp_task, families=("quant", "svd"), menu=menu, progress=False)


def test_weighted_loss_menu_is_solved_like_joint_allocate(mlp_task, engine):
    weighted = wb.BudgetExplorer(mlp_task, families=("quant", "gptq"), budget=0.1, loss="weighted", engine=engine,
                                 synchronous=True, progress=False, front_budgets=(0.2,))
    assert weighted.menu.loss == "weighted" and len(weighted.menu.weights) == 3
    again = wb.joint_allocate(mlp_task, 0.1, "bytes", ("quant", "gptq"), loss="weighted", engine=engine)
    assert weighted.plan == again.as_plan()


def test_task_model_untouched(mlp_task, explorer, snapshot):
    explorer.set_budget(0.09)
    assert state_bytes(mlp_task.model) == snapshot


def test_worker_thread_ends_on_the_last_budget(mlp_task, engine):
    live = wb.BudgetExplorer(mlp_task, families=("quant", "svd"), budget=0.5, engine=engine, progress=False,
                             front_budgets=(0.5,))
    for budget in (0.1, 0.2, 0.03, 0.12):
        live.slider.value = budget
    state = live.wait(timeout=120)
    assert state["budget"] == pytest.approx(0.12) and live.error.value == ""
    assert state["allocation"].bytes <= 0.12 * live.menu.total["bytes"]


def test_set_plan_moves_the_slider_to_that_plans_bytes(explorer):
    saved = explorer.set_budget(0.15)["allocation"]
    explorer.set_budget(0.5)
    explorer.set_plan(saved.as_plan())
    budget = explorer.slider.value
    assert saved.fraction_used <= budget < saved.fraction_used + 0.005 + 1e-9
    assert explorer.state["allocation"].predicted_loss <= saved.predicted_loss + 1e-7
