"""Incremental engine: same numbers as apply + evaluate, less work, bounded memory, exact previews."""
import dataclasses
import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

import workbench as wb
from conftest import state_bytes
from workbench.hooks import collect_layer_inputs
from workbench.engine import Engine
from workbench.stages import Stage, model_stages
from workbench.errors import WorkbenchError
from workbench.inventory import weight_matrix
from workbench.measure import count_flops, count_params, saved_bytes
from workbench.plan import LayerPlan, Plan
from workbench.registry import get_recipe


def payload_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def random_plans(engine, count, seed=0):
    rng, plan = random.Random(seed), Plan({})
    for _ in range(count):
        info = rng.choice(list(engine.layers.values()))
        plan = plan.with_layer(info.name, LayerPlan("svd", {"rank": rng.randint(1, min(info.shape))}))
        yield plan


@pytest.mark.parametrize("fixture", ["mlp_task", "cnn_task", "gru_task"])
def test_engine_equals_apply_then_evaluate(fixture, request):
    task = request.getfixturevalue(fixture)
    before = state_bytes(task.model)
    engine = Engine(task)
    for plan in random_plans(engine, 5, seed=1):
        result = engine.evaluate(plan)
        model = wb.apply(task.model, plan)
        assert result["metric"] == task.evaluate(model)  # bit-identical: same factors, same batches
        assert result["params"] == count_params(model)
        assert result["bytes"] == payload_bytes(model)
        assert result["flops"] == count_flops(model, task.example_input)
    assert state_bytes(task.model) == before


def test_other_methods_and_steps_match_apply(mlp_task, gru_task):
    engine = Engine(mlp_task, preview=False)
    plan = Plan({"fc1": LayerPlan("prune", {"ratio": 0.3}), "fc2": LayerPlan("quant", {"bits": 4}),
                 "fc3": LayerPlan("svd", {"rank": 4})})
    result = engine.evaluate(plan, file_bytes=True)
    model = wb.apply(mlp_task.model, plan)
    assert result["metric"] == mlp_task.evaluate(model)
    assert result["params"] == count_params(model)
    assert result["bytes_file"] == saved_bytes(model)
    steps = get_recipe("prune")(mlp_task.model, task=mlp_task, ratio=0.5, structured=True)
    assert steps.steps
    result = engine.evaluate(steps)
    assert result["full"] and result["metric"] == mlp_task.evaluate(wb.apply(mlp_task.model, steps))
    rnn_plan = Plan({"rnn": LayerPlan("svd_rnn", {"rank_ih": 4, "rank_hh": 8, "per_gate": True})})
    gru_engine = Engine(gru_task, preview=False)
    assert gru_engine.evaluate(rnn_plan)["metric"] == gru_task.evaluate(wb.apply(gru_task.model, rnn_plan))


def fresh_cnn():
    from workbench.zoo.digits import digits_cnn
    return digits_cnn()


def test_a_change_reruns_only_from_its_stage(mlp_task):
    engine = Engine(mlp_task, preview=False)
    # parameter-free children (the ReLUs) run inside the stage before them: no cache entry of their own
    assert [s.label for s in engine.stages] == ["fc1+act1", "fc2+act2", "fc3"]
    plan = Plan({"fc1": LayerPlan("svd", {"rank": 8})})
    assert engine.evaluate(plan)["from_stage"] == 0
    moved = plan.with_layer("fc3", LayerPlan("svd", {"rank": 3}))
    result = engine.evaluate(moved)
    assert result["from_stage"] == 2 and result["stages_run"] == 1
    assert engine.evaluate(moved.with_layer("fc2", LayerPlan("svd", {"rank": 5})))["from_stage"] == 1
    # back to an earlier plan: its activations are still cached
    assert engine.evaluate(plan.with_layer("fc3", LayerPlan("svd", {"rank": 7})))["from_stage"] == 2
    assert [s.label for s in model_stages(fresh_cnn())] == [
        "image", "conv1+act1", "conv2+act2+pool+flatten", "fc1+act3", "fc2"]


def test_cache_bound_evicts_and_falls_back(mlp_task):
    unbounded = Engine(mlp_task, preview=False)
    none = Engine(mlp_task, max_cache_bytes=0, preview=False)
    one_entry = 360 * 256 * 4
    small = Engine(mlp_task, max_cache_bytes=one_entry, preview=False)
    for plan in random_plans(unbounded, 12, seed=3):
        expected = unbounded.evaluate(plan)["metric"]
        assert none.evaluate(plan)["metric"] == expected
        assert small.evaluate(plan)["metric"] == expected
        assert small.report()["cache_bytes"] <= one_entry
    assert none.report()["cache_bytes"] == 0
    assert none.report()["full_evaluations"] == none.report()["evaluations"]
    assert small.report()["cache_evictions"] > 0
    assert unbounded.report()["cache_bytes"] > one_entry
    with pytest.raises(WorkbenchError, match="max_cache_bytes=-1"):
        Engine(mlp_task, max_cache_bytes=-1)


@pytest.mark.parametrize("fixture,layer", [("mlp_task", "fc2"), ("cnn_task", "conv2"), ("cnn_task", "fc1")])
def test_preview_matches_direct_computation(fixture, layer, request):
    task = request.getfixturevalue(fixture)
    engine = Engine(task)
    module = task.model.get_submodule(layer)
    w = weight_matrix(module).double()
    x = collect_layer_inputs(task.model, [layer], task.eval_inputs)[layer].double()
    for rank in (1, 5, 17):
        a, b = engine.factors.factors(layer, rank)
        delta = w - (a @ b).double()
        preview = engine.preview(layer, rank)
        assert preview["weight_error"] == pytest.approx(float(delta.norm() / w.norm()), rel=1e-4)
        if isinstance(module, nn.Conv2d):
            def out(kernel):
                return torch.nn.functional.conv2d(x, kernel.reshape(module.weight.shape), None, 1, module.padding)
        else:
            def out(kernel):
                return x @ kernel.T
        expected = float(out(delta).norm() / out(w).norm())
        assert preview["output_error"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(WorkbenchError, match="above min"):
        engine.preview(layer, 10_000)


def test_randomized_svd_is_sliced_only_up_to_its_rank():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(300, 280))
    u, _ = torch.linalg.qr(torch.randn(280, 280))
    v, _ = torch.linalg.qr(torch.randn(300, 280))
    with torch.no_grad():  # a decaying spectrum, as trained layers have
        big[0].weight.copy_(u @ torch.diag(0.9 ** torch.arange(280.0)) @ v.T)
    task = wb.Task("big", big.eval(), torch.randn(16, 300), torch.zeros(16, dtype=torch.long),
                   lambda out, y: float(out.sum()))
    engine = Engine(task, randomized_min_dim=200, preview=False)
    exact = torch.linalg.svdvals(big[0].weight.detach().double())
    f = engine.factors.get("0", upto=20)
    assert f.randomized and f.valid_rank == 20
    assert torch.allclose(f.s[:20].double(), exact[:20], rtol=1e-3)
    engine.factors.factors("0", 20)
    assert engine.factors.recomputes == 0
    a, b = engine.factors.factors("0", 150)          # beyond the computed rank: a full SVD now
    assert engine.factors.recomputes == 1 and not engine.factors.get("0").randomized
    assert torch.allclose(torch.linalg.svdvals((a @ b).double())[:150], exact[:150], rtol=1e-4, atol=1e-5)


def test_stage_protocol_and_fallback():
    class Declared(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

        def compression_stages(self):
            return [Stage("body", lambda m, x: torch.relu(m(x))), ("head", self.head)]

    class Opaque(Declared):  # no stages declared: cut in its torch.fx graph (workbench.graph_stages)
        compression_stages = None

    class Branching(Opaque):  # not traceable either: one stage, a full evaluation
        def forward(self, x):
            return self.head(torch.relu(self.body(x)) if x.sum() > 0 else torch.tanh(self.body(x)))

    x = torch.randn(10, 4)
    for cls, names, first in ((Declared, ["body", "head"], 1), (Opaque, [""], 1), (Branching, [""], 0)):
        model = cls().eval()
        assert [s.name for s in model_stages(model)] == names
        task = wb.Task("toy", model, x, torch.zeros(10, dtype=torch.long),
                       lambda out, y: float((out.argmax(-1) == y).float().mean()))
        engine = Engine(task)
        plan = Plan({"head": LayerPlan("svd", {"rank": 2})})
        result = engine.evaluate(plan)
        assert result["metric"] == task.evaluate(wb.apply(model, plan))
        assert result["from_stage"] == first


def test_bad_plan_changes_nothing(mlp_task):
    engine = Engine(mlp_task, preview=False)
    good = Plan({"fc1": LayerPlan("svd", {"rank": 9})})
    expected = engine.evaluate(good)["metric"]
    for bad, message in ((good.with_layer("fc2", LayerPlan("svd", {"rank": 999})), "above min"),
                         (good.with_layer("act1", LayerPlan("svd", {"rank": 1})), "cannot compress"),
                         (good.with_layer("nope", LayerPlan("svd", {"rank": 1})), "unknown layer")):
        with pytest.raises(WorkbenchError, match=message):
            engine.evaluate(bad)
    assert engine.evaluate(good)["metric"] == expected


def test_subset_and_model_declared_batches(mlp_task):
    class Grouped(nn.Sequential):
        """The MLP, evaluated in shuffled groups of 7 (as MiniLM groups sentences by length)."""

        def evaluation_batches(self, inputs):
            order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
            return list(order.split(7))

    sub = mlp_task.subset(100)
    assert len(sub.eval_inputs) == 100 and sub.model is mlp_task.model
    index = torch.linspace(0, len(mlp_task.eval_inputs) - 1, 100).round().long()
    assert torch.equal(sub.eval_inputs, mlp_task.eval_inputs[index])
    assert torch.equal(sub.eval_targets, mlp_task.eval_targets[index])
    assert mlp_task.subset(None) is mlp_task and mlp_task.subset(10**6) is mlp_task
    with pytest.raises(WorkbenchError, match="subset=0"):
        mlp_task.subset(0)

    grouped = dataclasses.replace(mlp_task, model=Grouped(OrderedDict(mlp_task.model.named_children())).eval())
    engine = Engine(grouped, subset=100, preview=False)
    assert len(engine._batches) == 15 and engine.task.eval_targets.shape == (100,)
    for plan in random_plans(engine, 4, seed=2):
        outputs = wb.apply(mlp_task.model, plan)(sub.eval_inputs)
        # outputs go back to the task's order before the metric: same predictions, row by row
        assert engine.evaluate(plan)["metric"] == pytest.approx(sub.metric(outputs, sub.eval_targets))

    class Broken(Grouped):
        def evaluation_batches(self, inputs):
            return [torch.arange(len(inputs) - 1)]

    with pytest.raises(WorkbenchError, match="exactly once"):
        Engine(dataclasses.replace(mlp_task, model=Broken(OrderedDict(mlp_task.model.named_children()))), preview=False)


@pytest.mark.parametrize("fixture", ["mlp_task", "cnn_task"])
def test_sizes_at_every_kind_of_rank_equal_the_built_layer(fixture, request):
    """The engine sizes plain ranks from ranks 1 and 2 (each cost is c0 + c1 * r): check the
    extrapolation against the model `apply` really builds, at the ends and in between."""
    task = request.getfixturevalue(fixture)
    engine = Engine(task, preview=False)
    for name, info in engine.layers.items():
        k = min(info.shape)
        for rank in sorted({1, 2, 3, k // 2 or 1, k}):
            plan = Plan({name: LayerPlan("svd", {"rank": rank})})
            result, model = engine.evaluate(plan), wb.apply(task.model, plan)
            assert (result["params"], result["bytes"], result["flops"]) == (
                count_params(model), payload_bytes(model), count_flops(model, task.example_input)), (name, rank)
            assert result["metric"] == task.evaluate(model)


def test_recurrent_sizes_from_rank_basis_equal_the_built_layer(gru_task):
    """``svd_rnn`` declares its ranks affine and separable; check that against real builds."""
    engine = Engine(gru_task, preview=False)
    rng = random.Random(4)
    cases = [(1, 1, True), (3, 17, True), (None, 40, True), (8, None, True), (5, 63, False), (2, 2, False)]
    cases += [(rng.randint(1, 8), rng.randint(1, 64), rng.random() < 0.5) for _ in range(6)]
    for rank_ih, rank_hh, per_gate in cases:
        plan = Plan({"rnn": LayerPlan("svd_rnn", {"rank_ih": rank_ih, "rank_hh": rank_hh, "per_gate": per_gate})})
        result, model = engine.evaluate(plan), wb.apply(gru_task.model, plan)
        assert (result["params"], result["bytes"], result["flops"]) == (
            count_params(model), payload_bytes(model), count_flops(model, gru_task.example_input))
        assert result["metric"] == gru_task.evaluate(model)


def test_the_public_layer_api_matches_what_apply_builds(mlp_task):
    """What the joint allocator asks the engine: `layer_size` is the applied model's sizes minus the
    original's (None: the layer's own), `built_layer` is apply's real layer (svd: factors, not the
    rank view), `calibration_inputs` are the layer's inputs on the calibration samples."""
    engine = Engine(mlp_task, preview=False)
    model, example = mlp_task.model, mlp_task.example_input
    base = (count_params(model), payload_bytes(model), count_flops(model, example))
    for name in engine.layers:
        for choice in (LayerPlan("svd", {"rank": 5}), LayerPlan("quant", {"bits": 4, "per_channel": True})):
            applied = wb.apply(model, Plan({name: choice}))
            sizes = (count_params(applied), payload_bytes(applied), count_flops(applied, example))
            assert engine.layer_size(name, choice) == tuple(a - b for a, b in zip(sizes, base)), (name, choice)
            built, expected = engine.built_layer(name, choice), applied.get_submodule(name)
            assert type(built) is type(expected) and state_bytes(built) == state_bytes(expected)
        layer = model.get_submodule(name)
        assert engine.layer_size(name, None)[:2] == (count_params(layer), payload_bytes(layer))
        assert engine.layer_info(name) is engine.layers[name]
    engine.collect_calibration(list(engine.layers))
    expected = collect_layer_inputs(model, list(engine.layers), mlp_task.calibration_inputs(engine.calibration_samples))
    for name in engine.layers:
        assert torch.equal(engine.calibration_inputs(name), expected[name])
    with pytest.raises(WorkbenchError, match="unknown layer 'nope'; layers with a weight matrix: fc1"):
        engine.layer_info("nope")


def test_a_model_that_needs_contiguous_activations_keeps_them():
    """A forward that flattens conv outputs with ``view`` cannot run on NHWC activations: the
    engine then keeps NCHW for its copy, and its numbers still equal apply + evaluate."""
    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            h = torch.relu(self.conv(x.reshape(-1, 1, 8, 8)))
            return self.fc(h.view(h.shape[0], -1))

    torch.manual_seed(0)
    model = ViewNet().eval()
    x = torch.randn(40, 64)
    task = wb.Task("view", model, x, torch.randint(0, 10, (40,)),
                   lambda out, y: float((out.argmax(-1) == y).float().mean()))
    engine = Engine(task, preview=False)
    assert not engine.channels_last
    plan = Plan({"conv": LayerPlan("svd", {"rank": 3}), "fc": LayerPlan("svd", {"rank": 5})})
    assert engine.evaluate(plan)["metric"] == task.evaluate(wb.apply(model, plan))
