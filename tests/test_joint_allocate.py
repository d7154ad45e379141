"""One allocator across families: brute-force oracle for the knapsack, exact bytes, pins, families, CLI."""
import itertools
import json

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.cli import main
from workbench.engine.sizing import state_bytes as payload_bytes
from workbench.errors import WorkbenchError
from workbench.plan import LayerPlan, Plan
from workbench.select import build_menu, joint_allocate, joint_fronts, menu_table
from workbench.select._menu import output_error
from conftest import state_bytes

matplotlib.use("Agg")

FAMILIES = ("quant", "gptq", "svd", "svd_quant", "prune")
#: HiGHS's optimality tolerance: picks whose summed losses differ by less are ties to the solver.
TOL = 1e-7


@pytest.fixture(scope="module")
def engine(mlp_task):
    return wb.Engine(mlp_task, preview=False, freeze_gc=False)


@pytest.fixture(scope="module")
def menu(mlp_task, engine):
    return build_menu(mlp_task, FAMILIES, engine=engine)


def applied(task, plan: Plan):
    return wb.apply(task.model, plan, calibration_inputs=task.calibration_inputs())


def brute_force(table, limit):
    best = (np.inf, None)
    for picks in itertools.product(*[range(len(c)) for c in table.costs]):
        if table.cost_of(picks) <= limit:
            best = min(best, (table.loss_of(picks), picks))
    return best


def test_menu_costs_and_losses_are_measured(mlp_task, menu):
    assert menu.layers == ["fc1", "fc2", "fc3"] and menu.total["bytes"] == payload_bytes(mlp_task.model)
    for l, name in enumerate(menu.layers):
        assert menu.choices[l][0] is None and menu.losses[l][0] == 0
        assert {"quant", "gptq", "svd", "prune"} <= set(menu.families[l])
        k = menu.families[l].index("svd")
        choice = menu.choices[l][k]
        model = applied(mlp_task, Plan({name: choice}))
        # exact bytes: the model with that layer alone compressed
        assert payload_bytes(model) == menu.fixed["bytes"] + sum(c[0] for c in menu.costs["bytes"]) \
            - menu.costs["bytes"][l][0] + menu.costs["bytes"][l][k]
        # proxy loss: relative output error, against the closed form of a truncated SVD's
        x = mlp_task.calibration_inputs() if l == 0 else None
        if x is not None:
            w = mlp_task.model.fc1.weight.detach().double()
            u, s, vh = np.linalg.svd(w.numpy(), full_matrices=False)
            r = choice["rank"]
            w_r = (u[:, :r] * s[:r]) @ vh[:r]
            xn = x.double().numpy()
            expected = np.sum((xn @ (w.numpy() - w_r).T) ** 2) / np.sum((xn @ w.numpy().T) ** 2)
            assert menu.losses[l][k] == pytest.approx(expected, rel=1e-3)
            assert output_error(mlp_task.model.fc1, mlp_task.model.fc1, x) == 0


def test_gram_proxy_equals_the_output_error_of_every_option(mlp_task, engine, menu):
    """The menu's Linear proxy comes from the cached Gram; it is the output error on the inputs."""
    checked = 0
    for l, name in enumerate(menu.layers):
        x, original = engine.calibration_inputs(name), mlp_task.model.get_submodule(name)
        for choice, loss in zip(menu.choices[l][1:], menu.losses[l][1:]):
            assert loss == pytest.approx(output_error(original, engine.built_layer(name, choice), x), rel=1e-4, abs=1e-9)
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("budget", [0.09, 0.11, 0.15, 0.3])
def test_knapsack_equals_brute_force(mlp_task, engine, menu, budget):
    table, _ = menu_table(menu, "bytes", ["quant"])
    assert [len(c) for c in table.costs] == [5, 5, 5]  # dense + 2, 3, 4, 8 bits per layer
    limit = budget * table.total
    best, picks = brute_force(table, limit)
    result = joint_allocate(mlp_task, budget, "bytes", ["quant"], engine=engine, menu=menu)
    assert result.predicted_loss == pytest.approx(best, abs=TOL)
    if result.predicted_loss > best + 1e-12:
        return  # a tie within the tolerance: another plan
    assert result.as_plan() == Plan({name: table.choices[l][k] for l, (name, k) in enumerate(zip(table.layers, picks))
                                     if table.choices[l][k] is not None})
    assert result.bytes == payload_bytes(applied(mlp_task, result.as_plan())) <= limit
    assert result.fraction_used == result.used / result.total <= budget


def test_joint_within_budget_exact_and_sane(mlp_task, engine, menu):
    before = state_bytes(mlp_task.model)
    result = joint_allocate(mlp_task, 0.10, "bytes", FAMILIES, engine=engine, menu=menu)
    model = applied(mlp_task, result.as_plan())
    assert result.bytes == payload_bytes(model) <= 0.10 * payload_bytes(mlp_task.model)
    assert result.metric == pytest.approx(mlp_task.evaluate(model), abs=1e-6)
    assert 0.5 < result.metric <= 1 and result.original_metric == pytest.approx(mlp_task.evaluate())
    print(f"digits-mlp at 10% of fp32 bytes: accuracy {result.original_metric:.4f} -> {result.metric:.4f}, "
          f"{result.fraction_used:.4f} of the bytes, {result.choices}")
    assert state_bytes(mlp_task.model) == before
    assert json.loads(json.dumps(result))["plan"] == result.as_plan().to_dict()


@pytest.mark.parametrize("budget", [0.07, 0.1, 0.2])
def test_joint_loss_at_most_every_single_family(mlp_task, engine, menu, budget):
    joint = joint_allocate(mlp_task, budget, "bytes", FAMILIES, engine=engine, menu=menu)
    singles = 0
    for family in FAMILIES:
        try:
            single = joint_allocate(mlp_task, budget, "bytes", [family], engine=engine, menu=menu)
        except WorkbenchError as exc:
            assert "below the smallest model" in str(exc)
            continue
        singles += 1
        assert joint.predicted_loss <= single.predicted_loss + TOL, family
        assert {c["family"] for c in single.choices.values()} <= {family, "dense"}
    assert singles >= 2


def test_pins_are_honoured(mlp_task, engine):
    pin = LayerPlan("svd", {"rank": 20})
    result = joint_allocate(mlp_task, 0.2, "bytes", ["quant"], pinned={"fc2": pin, "fc3": "dense"}, engine=engine)
    plan = result.as_plan()
    assert plan.layers["fc2"] == pin and "fc3" not in plan.layers
    assert result.choices["fc3"]["family"] == "dense" and result.choices["fc2"]["family"] == "pinned"
    assert plan.layers["fc1"].method == "quant"
    assert result.bytes == payload_bytes(applied(mlp_task, plan)) <= 0.2 * payload_bytes(mlp_task.model)
    with pytest.raises(WorkbenchError, match="below the smallest model.*with the pins"):
        joint_allocate(mlp_task, 0.1, "bytes", ["quant"], pinned={"fc2": "dense"}, engine=engine)
    with pytest.raises(WorkbenchError, match="pinned layer 'fc9'.*fc1, fc2, fc3"):
        joint_allocate(mlp_task, 0.2, "bytes", ["quant"], pinned={"fc9": "dense"}, engine=engine)


def test_bad_budget_and_family_refused(mlp_task, engine, menu):
    with pytest.raises(WorkbenchError, match=r"below the smallest model .* use a budget of at least 0\.0"):
        joint_allocate(mlp_task, 0.01, "bytes", FAMILIES, engine=engine, menu=menu)
    for budget in (0, 1.5, "half"):
        with pytest.raises(WorkbenchError, match="must be a fraction"):
            joint_allocate(mlp_task, budget, "bytes", FAMILIES, engine=engine, menu=menu)
    with pytest.raises(WorkbenchError, match="'lowrank' not known; families are: quant, kmeans, gptq"):
        joint_allocate(mlp_task, 0.1, "bytes", ["svd", "lowrank"], engine=engine, menu=menu)
    with pytest.raises(WorkbenchError, match="by='weights'"):
        joint_allocate(mlp_task, 0.1, "weights", FAMILIES, engine=engine, menu=menu)


def test_params_budget_and_fronts(mlp_task, engine, menu):
    result = joint_allocate(mlp_task, 0.3, "params", FAMILIES, engine=engine, menu=menu)
    assert result.params <= 0.3 * menu.total["params"]
    fronts = joint_fronts(mlp_task, [0.06, 0.125], "bytes", FAMILIES, engine=engine, menu=menu)
    assert set(fronts.fronts) == {*FAMILIES, "joint"} and len(fronts.winners) == 2
    assert fronts.fronts["prune"][0]["metric"] is None and "below the smallest" in fronts.fronts["prune"][0]["reason"]
    x, y = fronts.arrays("joint")
    assert len(x) == 2 and all(f <= b for f, b in zip(x, fronts.budgets))

    import matplotlib.pyplot as plt
    from workbench.plotting.budget import draw_budget_fronts, update_budget_pick

    fig, ax = plt.subplots()
    artists = draw_budget_fronts(ax, {label: fronts.arrays(label) for label in fronts.fronts},
                                 baseline=fronts.original_metric)
    assert set(artists["lines"]) == {*FAMILIES, "joint"}
    assert list(artists["lines"]["joint"].get_xdata()) == x
    assert update_budget_pick(artists, x[0], y[0]) is False
    assert list(artists["pick"].get_xdata()) == [x[0]]
    plt.close(fig)


def test_sensitivity_loss(mlp_task, engine):
    result = joint_allocate(mlp_task, 0.1, "bytes", ["quant"], loss="sensitivity", engine=engine)
    assert result.loss == "sensitivity" and result.predicted_loss >= 0
    assert result.bytes <= 0.1 * payload_bytes(mlp_task.model)


def test_cli_joint_allocate(capsys, mlp_task):
    assert main(["allocate", "digits-mlp", "--by", "bytes", "--budget", "0.125", "--families", "svd,quant,prune",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"fraction_used", "metric", "choices", "plan"} <= set(data)
    assert set(data["choices"]) == {"fc1", "fc2", "fc3"} and data["fraction_used"] <= 0.125
    model = applied(mlp_task, Plan.from_dict(data["plan"]))
    assert payload_bytes(model) == data["bytes"]
    assert mlp_task.evaluate(model) == pytest.approx(data["metric"], abs=1e-6)
    assert main(["allocate", "digits-mlp", "--budget", "0.1", "--families", "svd,nope"]) == 2
    assert "'nope' not known" in capsys.readouterr().err
    assert main(["allocate", "digits-mlp", "--by", "bytes", "--budget", "0.001", "--families", "quant"]) == 2
    assert "below the smallest model" in capsys.readouterr().err


class Lookup(nn.Module):
    """An embedding table, then two Linears: tables compete with matrix layers for the bytes."""

    def __init__(self):
        super().__init__()
        self.emb, self.hidden, self.out = nn.Embedding(300, 32), nn.Linear(32, 64), nn.Linear(64, 5)

    def forward(self, ids):
        return self.out(torch.relu(self.hidden(self.emb(ids).mean(1))))


def test_embeddings_included_on_request():
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (64, 12), generator=torch.Generator().manual_seed(0))
    task = wb.load(Lookup().eval(), eval_data=ids)
    without = joint_allocate(task, 0.5, "bytes", ["quant"], relative_to="layers")
    assert set(without.choices) == {"hidden", "out"} and without.total == payload_bytes(task.model) - 300 * 32 * 4
    result = joint_allocate(task, 0.2, "bytes", ["quant"], relative_to="layers", include_embeddings=True)
    assert result.choices["emb"]["method"] == "quant_embedding" and result.total == payload_bytes(task.model)
    model = wb.apply(task.model, result.as_plan())
    assert result.bytes == payload_bytes(model) <= 0.2 * payload_bytes(task.model)
    assert task.evaluate(model) == pytest.approx(result.metric, abs=1e-6)
    # the table's proxy: relative error of the rows looked up
    table = model.emb(ids).detach().double()
    reference = task.model.emb(ids).detach().double()
    expected = float(((table - reference) ** 2).sum() / (reference ** 2).sum())
    assert result.choices["emb"]["loss"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert main(["allocate", "digits-mlp", "--budget", "0.5", "--include-embeddings"]) == 2


class WithTable(nn.Module):
    """A model whose embedding table (not a candidate) holds bytes the budget must count."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(64, 32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.table(ids)))).mean(1)


def test_a_whole_model_budget_counts_the_bytes_outside_the_candidates():
    torch.manual_seed(0)
    task = wb.load(WithTable(), eval_data=torch.randint(0, 64, (32, 6)))
    menu = build_menu(task, ("quant", "svd"))
    assert menu.fixed["bytes"] > 0  # the table
    budget = (menu.fixed["bytes"] + 0.3 * sum(c[0] for c in menu.costs["bytes"])) / menu.total["bytes"]
    result = joint_allocate(task, budget, families=("quant", "svd"), menu=menu)
    assert result.fraction_used <= budget + 1e-9
    assert payload_bytes(wb.apply(task.model, result.as_plan())) <= budget * menu.total["bytes"]
    with pytest.raises(WorkbenchError, match="smallest"):
        joint_allocate(task, 0.9 * menu.fixed["bytes"] / menu.total["bytes"], families=("quant", "svd"), menu=menu)
