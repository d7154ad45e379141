"""loss="weighted": the proxy scaled by each layer's measured sensitivity (oracle, behaviour, bad input)."""
import json

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.plan import Plan
from workbench.select import build_menu, joint_allocate, selection_task
from workbench.select._menu import REFERENCE_BITS, WEIGHT_FLOOR, layer_weights, reference_option


class QuietBranch(nn.Module):
    """``y = 0.01 * quiet(x) + loud(x)``: two alike Linears, one of which barely reaches the output.
    Their relative output errors (the proxy) are alike; their effect on the output is not."""

    def __init__(self):
        super().__init__()
        self.quiet, self.loud = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        return 0.01 * self.quiet(x) + self.loud(x)


@pytest.fixture(scope="module")
def branch_task():
    torch.manual_seed(0)
    net = QuietBranch().eval()
    g = torch.Generator().manual_seed(1)
    return wb.load(net, eval_data=torch.randn(256, 32, generator=g), train_data=torch.randn(512, 32, generator=g))


@torch.no_grad()
def relative_output_error(original: nn.Linear, model: nn.Module, name: str, x: torch.Tensor) -> float:
    built = dict(model.named_modules())[name]
    reference = x @ original.weight.T
    return float(((built(x) - original.bias) - reference).pow(2).sum() / reference.pow(2).sum())


def test_weights_are_the_measured_drop_per_unit_of_proxy(branch_task):
    engine = wb.Engine(branch_task, preview=False, freeze_gc=False)
    names = ["quiet", "loud"]
    weights = layer_weights(engine, branch_task, names)
    judge = selection_task(branch_task)
    base = judge.evaluate(branch_task.model)
    drops, proxies = [], []
    for name in names:
        plan = Plan({name: reference_option(getattr(branch_task.model, name))})
        assert plan.layers[name].params["bits"] == REFERENCE_BITS
        model = wb.apply(branch_task.model, plan)
        drops.append(base - judge.evaluate(model))
        proxies.append(relative_output_error(getattr(branch_task.model, name), model, name,
                                             engine.calibration_inputs(name)))
    assert drops[1] > 100 * drops[0] > 0          # the loud layer matters far more
    expected = [max(d, WEIGHT_FLOOR * max(drops)) / p for d, p in zip(drops, proxies)]
    assert weights == pytest.approx(expected, rel=1e-4)


def test_weighted_pick_gives_the_bytes_to_the_layer_that_matters(branch_task):
    families = ["quant"]
    proxy = joint_allocate(branch_task, 0.25, "bytes", families, relative_to="layers")
    weighted = joint_allocate(branch_task, 0.25, "bytes", families, relative_to="layers", loss="weighted")
    assert weighted.loss == "weighted" and weighted.fraction_used <= 0.25
    bits = {name: c["params"].get("bits") for name, c in weighted.choices.items()}
    assert bits["quiet"] < bits["loud"]
    # the proxy cannot tell the two apart; the weighted pick is measurably better on the metric
    assert weighted.metric > proxy.metric


def test_weighted_menu_scales_each_layer_of_the_proxy_menu(branch_task):
    engine = wb.Engine(branch_task, preview=False, freeze_gc=False)
    plain = build_menu(branch_task, ["quant", "svd"], engine=engine)
    weighted = build_menu(branch_task, ["quant", "svd"], engine=engine, loss="weighted")
    assert plain.weights is None and len(weighted.weights) == 2
    for l in range(2):
        assert weighted.losses[l] == pytest.approx(plain.losses[l] * weighted.weights[l])


def test_weighted_loss_needs_a_split_and_is_refused_where_it_does_not_apply(capsys):
    net = nn.Sequential(nn.Linear(8, 8)).eval()
    task = wb.load(net, eval_data=torch.randn(16, 8))
    with pytest.raises(WorkbenchError, match="no validation or training split"):
        build_menu(task, ["quant"], loss="weighted")
    with pytest.raises(WorkbenchError, match="loss='nope' must be one of proxy, sensitivity, weighted"):
        build_menu(task, ["quant"], loss="nope")
    assert main(["allocate", "digits-mlp", "--budget", "0.3", "--loss", "weighted"]) == 2
    assert "--loss weighted needs --families" in capsys.readouterr().err


def test_cli_weighted_joint_allocation(capsys):
    assert main(["allocate", "digits-mlp", "--by", "bytes", "--budget", "0.1", "--families", "quant,gptq",
                 "--loss", "weighted", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["loss"] == "weighted" and data["fraction_used"] <= 0.1
