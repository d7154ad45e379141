"""Tied groups reach recipes and sliders: one choice for the shared matrix, given to every member and
stored once; groups a method cannot serve stay dense with the reason. Oracles: closed-form
parameter counts, ``model.parameters()`` (a shared tensor once), ``apply`` + ``measure`` against
``Engine.evaluate``, and the plans of the untied layers unchanged."""
import pytest
import torch
from torch import nn

import workbench as wb
from conftest import Tied, state_bytes as snapshot
from test_tied import real_params
from workbench.cli.bench import latency
from workbench.cli.compress import layer_rows, left_dense
from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.inventory import tied_groups
from workbench.kernels.svd import rank_for_ratio
from workbench.layers.lowrank import LowRankLinear
from workbench.plan import LayerPlan, Plan
from workbench.ties import TiedLayer, payload_bytes
from workbench.widgets.dashboard import Dashboard, knobs_for

GROUP = ("enc", "dec")


class Untied(Tied):
    """`Tied`'s layers without the tie: the untied layers' plans must not change."""

    def __init__(self):
        super().__init__()
        self.dec.weight = nn.Parameter(self.enc.weight.detach().clone())


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


def test_svd_ratio_gives_the_group_one_rank_and_stores_its_factors_once(tied, tied_task):
    before = snapshot(tied)
    plan = wb.recipe("svd")(tied, ratio=0.5)
    rank = rank_for_ratio((64, 64), 0.5)
    assert plan.layers["enc"] == plan.layers["dec"] == LayerPlan("svd", {"rank": rank}) and not plan.left_dense
    untied = wb.recipe("svd")(Untied(), ratio=0.5)
    assert {k: v for k, v in plan.layers.items() if k not in GROUP} == \
           {k: v for k, v in untied.layers.items() if k not in GROUP}  # the other layers as before
    model = wb.apply(tied, plan)
    assert model.enc.core is model.dec.core and isinstance(model.enc.core, LowRankLinear)
    r_mid, r_out = plan.layers["mid"]["rank"], plan.layers["out"]["rank"]
    expected = (rank * (64 + 64) + 64 + 64  # one factor pair, two own biases
                + r_mid * (64 + 32) + 32 + r_out * (32 + 64) + 64)
    measured = wb.measure(model, tied_task, latency=False)
    assert measured["params"] == real_params(model) == expected
    result = Engine(tied_task, freeze_gc=False).evaluate(plan)
    assert result["metric"] == measured["metric"] == tied_task.evaluate(model)
    assert result["params"] == expected and result["bytes"] == payload_bytes(model.state_dict()) == expected * 4
    assert snapshot(tied) == before and tied.dec.weight is tied.enc.weight


def test_energy_ranks_and_layers_name_the_group_through_any_member(tied):
    svd = wb.recipe("svd")
    energy = svd(tied, energy=0.5)  # a random 64x64 weight keeps half its energy below breakeven
    assert energy.layers["enc"] == energy.layers["dec"]
    assert dict(svd(tied, ranks={"dec": 8}).layers) == dict.fromkeys(GROUP, LayerPlan("svd", {"rank": 8}))
    assert set(svd(tied, ratio=0.5, layers=["enc"]).layers) == set(GROUP)
    with pytest.raises(WorkbenchError, match=r"tied layers \['enc', 'dec'\] different ranks \(8 and 4\)"):
        svd(tied, ranks={"enc": 8, "dec": 4})


@pytest.mark.parametrize("name, options, core", [
    ("prune", {"ratio": 0.3}, "SparseLinear"), ("quant", {"bits": 4}, "QuantLinear"),
    ("int8", {}, "Int8Linear"), ("svd", {"ratio": 0.5, "activation_aware": "whiten"}, "LowRankLinear")])
def test_every_matrix_recipe_takes_the_group_as_one(tied, tied_task, name, options, core):
    plan = wb.recipe(name)(tied, **options)
    assert plan.layers["enc"] == plan.layers["dec"] and not plan.left_dense
    model = wb.apply(tied, plan, calibration_inputs=tied_task.calibration_inputs())
    assert isinstance(model.enc, TiedLayer) and model.enc.core is model.dec.core
    assert type(model.enc.core).__name__ == core
    result = Engine(tied_task, freeze_gc=False).evaluate(plan)
    measured = wb.measure(model, tied_task, latency=False)
    assert result["metric"] == measured["metric"]
    assert result["params"] == measured["params"] and result["bytes"] == payload_bytes(model.state_dict())


def test_a_global_prune_cut_counts_the_shared_weight_once(tied):
    plan = wb.recipe("prune")(tied, ratio=0.3, scope="global")
    cut = plan.layers["enc"]["threshold"]
    weights = torch.cat([tied.enc.weight.flatten(), tied.mid.weight.flatten(), tied.out.weight.flatten()]).abs()
    kept = int((weights > cut).sum())
    assert kept == round(0.3 * weights.numel())  # the shared weight once; twice would move the cut


def test_methods_that_cannot_serve_the_group_leave_it_dense_and_say_why(tied, tied_task):
    structured = wb.recipe("prune")(tied, ratio=0.5, structured=True, input_shape=[1, 64])
    assert "structured pruning" in structured.left_dense[GROUP]
    sequential = wb.recipe("svd")(tied, ratio=0.5, activation_aware="whiten", sequential=True)
    assert not set(GROUP) & set(sequential.layers) and set(sequential.layers) == {"mid", "out"}
    assert "sequential calibration" in sequential.left_dense[GROUP]
    model = wb.apply(tied, sequential, calibration_inputs=tied_task.calibration_inputs())
    assert model.dec.weight is model.enc.weight  # dense, still one tensor
    rows = {row["name"]: row["reason"] for row in left_dense(tied, sequential)}
    assert "sequential calibration" in rows["enc + dec"]
    assert sequential.with_layer("mid", None).left_dense == sequential.left_dense
    assert not sequential.with_layer("enc", None).left_dense  # a note about a group the user changes goes


def test_a_tied_embedding_and_lm_head_stay_dense_with_the_reason():
    gpt2 = tiny_gpt2()
    group = ("transformer.wte", "lm_head")
    assert [g.names for g in tied_groups(gpt2)] == [group] and tied_groups(gpt2)[0].info is None
    for name, options in (("svd", {"ratio": 0.5}), ("quant", {"bits": 8}), ("prune", {"ratio": 0.3})):
        plan = wb.recipe(name)(gpt2, **options)
        assert not set(group) & set(plan.layers) and "lookup table" in plan.left_dense[group]
        assert plan.layers  # the blocks' layers are still compressed
    with pytest.raises(WorkbenchError, match="'lm_head' cannot be compressed.*lookup table"):
        wb.recipe("svd")(gpt2, ranks={"lm_head": 8})


def test_int8_leaves_a_tied_conv_group_dense_with_the_reason():
    class TiedConvs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.head(self.b(self.a(x)).mean((2, 3)))

    plan = wb.recipe("int8")(TiedConvs())
    assert set(plan.layers) == {"head"} and "conv layers" in plan.left_dense[("a", "b")]
    quant = wb.recipe("quant")(TiedConvs(), bits=4)
    assert quant.layers["a"] == quant.layers["b"] and not quant.left_dense


def test_one_knob_per_tied_group_moves_every_member(tied, tied_task):
    knobs = knobs_for(tied)
    assert [k.layers for k in knobs] == [GROUP, ("mid",), ("out",)]
    group = knobs[0]
    assert "enc + dec (tied)" in group.description and group.maximum == 64
    dashboard = Dashboard(tied_task, synchronous=True, reference=False)
    state = dashboard.set_rank("enc", 8)
    assert state["plan"] == Plan(dict.fromkeys(GROUP, LayerPlan("svd", {"rank": 8})))
    model = wb.apply(tied, state["plan"])
    measured = wb.measure(model, tied_task, latency=False)
    assert state["result"]["bytes"] == payload_bytes(model.state_dict()) == 4 * measured["params"]
    assert state["result"]["params"] == measured["params"] == real_params(tied) - 64 * 64 + 8 * 128
    assert state["result"]["metric"] == dashboard.engine.task.evaluate(model)
    assert dashboard.settings_for(state["plan"]) == {"enc": 8, "mid": 32, "out": 32}
    with pytest.raises(WorkbenchError, match="tied layers \\['enc', 'dec'\\] different settings"):
        dashboard.settings_for(Plan({"enc": LayerPlan("svd", {"rank": 8})}))
    assert dashboard.set_rank("enc", 64)["plan"] == Plan({})  # back to dense: undo


def test_the_latency_bench_moves_tied_knobs_and_agrees(tied_task):
    out = latency(tied_task, moves=6, render=False)
    assert out["knobs"] == 3 and out["metric_agrees"]


def test_compress_rows_show_the_group_once(tied):
    plan = wb.recipe("svd")(tied, ratio=0.5)
    rows = {row["name"]: row for row in layer_rows(tied, wb.apply(tied, plan), plan)}
    rank = plan.layers["enc"]["rank"]
    assert rows["enc + dec (tied)"]["params_before"] == 64 * 64 + 2 * 64
    assert rows["enc + dec (tied)"]["params_after"] == rank * 128 + 2 * 64
    assert not any(row["name"] in GROUP for row in left_dense(tied, plan))
