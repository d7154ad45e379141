"""Tied weights (``dec.weight = enc.weight``): counted once, compressed as one or left dense, saved
once and tied again on load. Oracles: ``model.parameters()`` (which yields a shared tensor once),
the tensors of a file written by ``safetensors.torch.save_model``, and ``apply`` + ``evaluate``."""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_model
from torch import nn

import workbench as wb
from conftest import Tied, state_bytes as snapshot
from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.export import load_compressed, save_compressed
from workbench.layers.lowrank import LowRankLinear
from workbench.measure import count_flops, count_params, saved_bytes
from workbench.plan import LayerPlan, Plan
from workbench.ties import TiedLayer, fill_tied, payload_bytes, tied_module_groups
from workbench.zoo.user import fit_state_dict, read_state_dict


def real_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # yields a shared Parameter once


def file_tensor_bytes(path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())


GROUP = ("enc", "dec")


def group_plan(choice: LayerPlan) -> Plan:
    return Plan({"enc": choice, "dec": choice})


def test_groups_are_found_by_shared_parameters():
    model = Tied()
    assert tied_module_groups(model) == [GROUP]
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)  # one module registered under two names
    assert tied_module_groups(twice) == [("0", "2")]
    assert tied_module_groups(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))) == []


def test_the_shared_tensor_is_counted_once(tied, tied_task):
    per_module = sum(p.numel() for m in tied.modules() for p in m.parameters(recurse=False))
    assert per_module - real_params(tied) == tied.enc.weight.numel()  # the double count of the bug
    assert count_params(tied) == real_params(tied)
    assert wb.measure(tied, tied_task, latency=False)["params"] == real_params(tied)
    engine = Engine(tied_task, preview=False, freeze_gc=False)
    assert engine.base["params"] == real_params(tied)
    assert engine.base["bytes"] == payload_bytes(tied.state_dict()) == real_params(tied) * 4


def test_bytes_are_counted_once_as_save_model_writes_them(tied, tmp_path):
    path = tmp_path / "tied.safetensors"
    save_model(tied, str(path))
    payload = real_params(tied) * 4
    assert file_tensor_bytes(path) == payload == payload_bytes(tied.state_dict())
    duplicate = tied.enc.weight.numel() * 4
    # torch.save writes each storage once: the file is the payload plus container overhead only
    assert payload < saved_bytes(tied) < payload + duplicate // 4


@pytest.mark.parametrize("plan, given", [
    (Plan({"enc": LayerPlan("svd", {"rank": 8})}), "leaves \\['dec'\\] dense"),
    (Plan({"dec": LayerPlan("quant", {"bits": 4})}), "leaves \\['enc'\\] dense"),
    (Plan({"enc": LayerPlan("svd", {"rank": 8}), "dec": LayerPlan("svd", {"rank": 4})}), "'dec': svd\\(rank=4\\)"),
])
def test_a_plan_splitting_a_tied_group_is_refused(tied, tied_task, plan, given):
    before = snapshot(tied)
    message = "'enc' \\(Linear\\), 'dec' \\(Linear\\) share one weight tensor.*give all of \\['enc', 'dec'\\] the same"
    with pytest.raises(WorkbenchError, match=message) as refused:
        wb.apply(tied, plan)
    assert refused.match(given)
    engine = Engine(tied_task, preview=False, freeze_gc=False)
    with pytest.raises(WorkbenchError, match=message):
        engine.evaluate(plan)
    assert engine.evaluate(Plan({}))["params"] == real_params(tied)  # nothing half-installed
    assert snapshot(tied) == before and tied.dec.weight is tied.enc.weight


def test_a_whole_group_svd_plan_stores_one_factorization(tied):
    rank = 8
    compressed = wb.apply(tied, group_plan(LayerPlan("svd", {"rank": rank})))
    assert isinstance(compressed.enc, TiedLayer) and isinstance(compressed.dec, TiedLayer)
    core = compressed.enc.core
    assert compressed.dec.core is core and isinstance(core, LowRankLinear)
    assert compressed.enc.bias is not compressed.dec.bias  # each member keeps its own bias
    assert torch.equal(compressed.dec.bias, tied.dec.bias)
    expected = real_params(tied) - 64 * 64 + rank * (64 + 64)
    assert count_params(compressed) == real_params(compressed) == expected < real_params(tied)
    # the same computation as each member factorized on its own (built the untied way)
    x = torch.randn(10, 64)
    alone = LowRankLinear.from_linear(tied.dec, rank)
    torch.testing.assert_close(compressed.dec(x), alone(x), rtol=1e-5, atol=1e-6)


def test_a_group_sharing_its_bias_too_gets_one_module_object():
    torch.manual_seed(0)
    model = Tied(bias=False)
    compressed = wb.apply(model, group_plan(LayerPlan("svd", {"rank": 8})))
    assert compressed.enc is compressed.dec and isinstance(compressed.enc, LowRankLinear)
    assert count_params(compressed) == real_params(compressed) == real_params(model) - 64 * 64 + 8 * 128


def test_members_that_are_not_the_same_layer_are_refused():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Conv2d(8, 8, 1)
            self.b.weight = nn.Parameter(self.a.weight.detach().reshape(8, 8, 1, 1))
            self.c = nn.Linear(8, 8)
            self.c.weight = self.a.weight
            self.c.bias = self.a.bias
            self.c.in_features = 9  # a different configuration with the same tensors

        def forward(self, x):
            return self.c(self.a(x))

    with pytest.raises(WorkbenchError, match="'a' .*and 'c' .*configured differently"):
        wb.apply(Mixed(), Plan({"a": LayerPlan("svd", {"rank": 2}), "c": LayerPlan("svd", {"rank": 2})}))


@pytest.mark.parametrize("choice", [LayerPlan("svd", {"rank": 8}), LayerPlan("quant", {"bits": 4}),
                                    LayerPlan("prune", {"ratio": 0.5}),
                                    LayerPlan("svd_aware", {"rank": 8, "aware": "whiten"})],
                         ids=lambda c: c.method)
def test_engine_equals_apply_on_a_tied_group(tied, tied_task, choice):
    engine = Engine(tied_task, freeze_gc=False)
    plan = group_plan(choice).with_layer("mid", LayerPlan("svd", {"rank": 4}))
    result = engine.evaluate(plan)
    model = engine.build(plan)
    assert model.enc.core is model.dec.core
    assert result["metric"] == tied_task.evaluate(model)  # bit-identical
    assert result["params"] == count_params(model) == wb.measure(model, tied_task, latency=False)["params"]
    assert result["params"] < engine.base["params"]
    assert result["bytes"] == payload_bytes(model.state_dict())
    assert result["flops"] == count_flops(model, tied_task.example_input)
    assert engine.evaluate(Plan({}))["metric"] == engine.base["metric"]  # the group uninstalls
    assert engine.evaluate(plan)["metric"] == result["metric"]  # and installs again from the memo


@pytest.mark.parametrize("choice", [None, LayerPlan("svd", {"rank": 8}), LayerPlan("quant", {"bits": 4})],
                         ids=["dense", "svd", "quant"])
def test_save_and_load_are_bit_exact_with_ties_restored(tied, tmp_path, choice):
    plan = Plan({}) if choice is None else group_plan(choice)
    model = wb.apply(tied, plan)
    path = save_compressed(tmp_path / "tied.safetensors", model, plan, "tied-mlp", original=tied)
    with safe_open(str(path), framework="pt") as handle:
        names = set(handle.keys())
    assert file_tensor_bytes(path) == payload_bytes(model.state_dict())  # the shared tensor stored once
    loaded = load_compressed(path, original=tied).model
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(5, 64)
    assert torch.equal(loaded(x), model(x))
    if choice is None:
        assert "dec.weight" not in names and loaded.dec.weight is loaded.enc.weight
    else:
        assert loaded.dec.core is loaded.enc.core
        assert not any(name.startswith("dec.core.") for name in names)


def test_a_save_model_file_fills_its_dropped_names(tied, tmp_path):
    path = tmp_path / "tied.safetensors"
    save_model(tied, str(path))
    state = read_state_dict(Path(path))
    assert set(tied.state_dict()) - set(state)  # save_model dropped one name of the tie
    fresh = Tied()
    fit_state_dict(fresh, fill_tied(state, fresh), str(path))
    assert fresh.dec.weight is fresh.enc.weight
    for key, value in tied.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    untied = {**tied.state_dict(), "dec.weight": torch.zeros(64, 64)}
    with pytest.raises(WorkbenchError, match="different values for 'enc.weight' and 'dec.weight'"):
        fill_tied(untied, fresh)


def test_wb_load_reads_a_save_model_file(tied, tmp_path):
    path = tmp_path / "tied.safetensors"
    save_model(tied, str(path))
    x = torch.randn(16, 64)
    task = wb.load(str(path), constructor=Tied, eval_data=x)
    assert task.model.dec.weight is task.model.enc.weight
    assert torch.equal(task.model(x), tied(x))
