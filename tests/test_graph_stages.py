"""Stages cut in a model's `torch.fx` graph (`workbench.graph_stages`, the fallback of
`workbench.auto_stages.find_stages` for models without a list of blocks): the cuts fall where one
tensor carries all the state (a residual network's block boundaries), the staged run equals the
forward, a slider move re-runs only from the moved layer's stage with the metric of `wb.apply`,
an untraceable forward is one stage with the reason, and the user's model is left as it was."""
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.auto_stages import find_stages
from workbench.data import digits_split
from workbench.graph_stages import MAX_STAGES, trace
from workbench.plan import LayerPlan, Plan


class Residual(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class DigitsResNet(nn.Module):
    """8x8 digits as rows of 64 pixels; three residual blocks held as plain attributes."""

    def __init__(self, channels=8):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn = nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels)
        self.block1, self.block2, self.block3 = Residual(channels), Residual(channels), Residual(channels)
        self.head = nn.Linear(channels, 10)
        with torch.no_grad():  # running statistics that are not the identity
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x.view(-1, 1, 8, 8))))
        x = self.block3(self.block2(self.block1(x)))
        return self.head(x.mean((2, 3))) * torch.tensor(2.0)   # a constant the tracer stores on the model


class Chain(nn.Module):
    """Linear layers as attributes, called one after another (no nn.Sequential)."""

    def __init__(self, widths=(64, 32, 32, 16, 10)):
        super().__init__()
        torch.manual_seed(0)
        self.names = [f"fc{i}" for i in range(len(widths) - 1)]
        for name, (a, b) in zip(self.names, zip(widths, widths[1:])):
            setattr(self, name, nn.Linear(a, b))

    def forward(self, x):
        for name in self.names[:-1]:
            x = torch.relu(getattr(self, name)(x))
        return getattr(self, self.names[-1])(x)


class Branching(Chain):
    def forward(self, x):
        if x.sum() > 0:                                            # data-dependent: fx cannot trace it
            x = torch.relu(self.fc0(x))
        else:
            x = torch.tanh(self.fc0(x))
        return self.fc3(self.fc2(self.fc1(x)))


def digits(n=120):
    return digits_split().x_test[:n]


def run(stages, model, x):
    with torch.no_grad():
        for stage in stages:
            x = stage.run(model, x)
    return x


def block(name):
    return (f"{name}.conv1", f"{name}.bn1", f"{name}.conv2", f"{name}.bn2")


def test_a_residual_network_is_cut_at_its_block_boundaries():
    model, x = DigitsResNet().eval(), digits()
    stages, why = find_stages(model, x[:1])
    assert [s.owned for s in stages] == [("stem", "bn"), block("block1"), block("block2"), block("block3"), ("head",)]
    assert why.startswith("5 stages: segments of the torch.fx graph cut where one tensor carries the state")
    assert why.endswith("no nn.ModuleList / nn.Sequential of two or more same-type blocks found)")
    assert stages[1].label == "graph segment 1: block1.conv1..block1.bn2"
    with torch.no_grad():
        assert torch.allclose(run(stages, model, x), model(x), rtol=1e-5, atol=1e-6)


def test_a_move_in_the_last_block_reruns_from_its_stage_with_the_metric_of_apply():
    task = wb.load(DigitsResNet().eval(), eval_data=digits())
    engine = wb.Engine(task, preview=False)
    assert engine.report()["stages_found"].startswith("5 stages: segments of the torch.fx graph")
    plan = Plan({"block3.conv2": LayerPlan("svd", {"rank": 2})})
    assert engine.stage_of("block3.conv2") == 3
    result = engine.evaluate(plan)
    assert result["from_stage"] == 3 and result["stages_run"] == 2
    expected = task.evaluate(wb.apply(task.model, plan))
    assert result["metric"] == pytest.approx(expected, rel=1e-5)
    assert result["metric"] != pytest.approx(engine.base["metric"], rel=1e-7)   # the swapped layer is the one run
    assert engine.evaluate(Plan({}))["metric"] == engine.base["metric"]


def test_a_chain_of_linear_layers_is_one_stage_per_layer():
    model, x = Chain().eval(), digits()
    stages, _ = find_stages(model, x[:1])
    assert [s.owned for s in stages] == [("fc0",), ("fc1",), ("fc2",), ("fc3",)]
    task = wb.load(model, eval_data=x)
    engine = wb.Engine(task, preview=False)
    plan = Plan({"fc1": LayerPlan("svd", {"rank": 4})})
    result = engine.evaluate(plan)
    assert result["from_stage"] == 1 and result["stages_run"] == 3
    assert result["metric"] == pytest.approx(task.evaluate(wb.apply(model, plan)), rel=1e-5)
    skipped = engine.stats["stages_skipped"]
    result = engine.evaluate(Plan({"fc1": LayerPlan("svd", {"rank": 4}), "fc2": LayerPlan("svd", {"rank": 3})}))
    assert result["from_stage"] == 2 and result["stages_run"] == 2 and engine.stats["stages_skipped"] - skipped == 2


def test_many_cut_points_are_merged_to_at_most_max_stages():
    model, x = Chain(widths=(64,) + (12,) * 24 + (10,)).eval(), digits()
    stages, _ = find_stages(model, x[:1])
    assert len(stages) == MAX_STAGES
    owned = [name for stage in stages for name in stage.owned]
    assert owned == model.names                                   # every layer in one stage, in order
    with torch.no_grad():
        assert torch.allclose(run(stages, model, x), model(x), rtol=1e-5, atol=1e-6)


def test_an_untraceable_forward_is_one_stage_saying_why():
    model, x = Branching().eval(), digits()
    stages, why = find_stages(model, x[:1])
    assert [s.name for s in stages] == [""] and stages[0].owns("fc2")
    assert why == ("1 stage: no nn.ModuleList / nn.Sequential of two or more same-type blocks found; torch.fx: cannot "
                   "trace the forward (TraceError: symbolically traced variables cannot be used as inputs to control flow)")
    task = wb.load(model, eval_data=x)
    engine = wb.Engine(task, preview=False)
    plan = Plan({"fc2": LayerPlan("svd", {"rank": 4})})
    result = engine.evaluate(plan)
    assert result["from_stage"] == 0
    assert result["metric"] == pytest.approx(task.evaluate(wb.apply(model, plan)), rel=1e-6)


class Recurrent(nn.Module):
    """Embedding, GRU, head: the GRU (a layer ``svd_rnn`` compresses) and the head are two stages."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.rnn, self.head = nn.Embedding(12, 8), nn.GRU(8, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out[:, -1])


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return torch.relu(self.fc(x * 2))


def test_a_recurrent_layer_is_a_stage_and_one_layer_is_nothing_to_cut():
    tokens = torch.randint(12, (30, 7), generator=torch.Generator().manual_seed(0))
    model = Recurrent().eval()
    stages, _ = find_stages(model, tokens[:1])
    assert [s.owned for s in stages] == [("embed", "rnn"), ("head",)]
    with torch.no_grad():
        assert torch.allclose(run(stages, model, tokens), model(tokens), rtol=1e-5, atol=1e-6)
    stages, why = find_stages(OneLayer(), digits()[:1])
    assert len(stages) == 1 and why.endswith("torch.fx: none of the 3 points of its graph (5 nodes) where one tensor "
                                             "carries the state lies between two of the 1 layer calls a method compresses")


@pytest.mark.parametrize("training", [False, True])
def test_the_users_model_is_left_as_it_was(training):
    model = DigitsResNet().train(training)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}
    if not training:  # found on the model itself (the engine's working copy is in eval mode)
        stages, _ = find_stages(model, digits()[:1])
        assert len(stages) == 5
    engine = wb.Engine(wb.load(model, eval_data=digits()), preview=False)
    engine.evaluate(Plan({"block2.conv1": LayerPlan("svd", {"rank": 2})}))
    assert model.training == training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes  # no _tensor_constant0
    for module in model.modules():
        assert module.training == training
        assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def test_tracing_puts_back_what_the_traced_forward_sets_on_the_model():
    class Caching(Chain):
        def forward(self, x):
            self.fc1.last_input, self.fc1.training = x, "traced"   # attributes set by the forward itself
            return super().forward(x)

    model = Caching().eval()
    attributes = {name: dict(vars(module)) for name, module in model.named_modules()}
    graph, _ = trace(model)
    assert sum(node.op == "call_module" for node in graph.nodes) == 4
    assert {name: dict(vars(module)) for name, module in model.named_modules()} == attributes
