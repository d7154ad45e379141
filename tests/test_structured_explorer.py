"""StructuredExplorer (workbench/widgets/structured.py), headless: a slider keeps exactly that many of
its group's best channels in the really pruned model, the figure and table follow, the sizes agree
with the pruned model's own counts, the user's model is untouched, bad values change nothing."""
import threading

import numpy as np
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.engine.sizing import state_bytes as payload_bytes
from workbench.errors import WorkbenchError
from workbench.measure import count_flops, count_params
from workbench.plan import LayerPlan, Plan
from workbench.registry import get_recipe
from workbench.widgets.structured import GroupKnob, StructuredExplorer, channel_knobs

from conftest import state_bytes

FAST = {"repeats": 1, "batches": (8, 16), "batch": 8}  # timings are shown, never asserted


def width(module):
    return {nn.Conv2d: lambda m: m.out_channels, nn.BatchNorm2d: lambda m: m.num_features,
            nn.Linear: lambda m: m.out_features}[type(module)](module)


@pytest.fixture(scope="module")
def resnet_task():
    return wb.load("digits-resnet")


@pytest.fixture(scope="module")
def resnet(resnet_task):
    return StructuredExplorer(resnet_task, synchronous=True, **FAST)


def test_one_knob_per_coupled_group_in_module_order(resnet):
    assert [(k.name, k.channels, k.kind) for k in resnet.knobs] == [
        ("stem", 32, "channels"), ("block1.conv1", 32, "channels"),
        ("block2.conv1", 64, "channels"), ("block2.shortcut.conv", 64, "channels")]
    # the sliders start dense, at their right end, and the dense plan is the empty plan
    assert {n: s.value for n, s in resnet.sliders.items()} == {k.name: k.channels for k in resnet.knobs}
    assert all(s.min == 1 for s in resnet.sliders.values()) and resnet.plan == Plan({})
    assert resnet.state["flop_ratio"] == 1.0 and resnet.state["result"]["params"] == resnet.base["params"]


def test_a_slider_keeps_exactly_its_best_channels(resnet, resnet_task):
    original = resnet_task.model
    snapshot = state_bytes(original)
    state = resnet.set_kept("stem", 8)
    assert resnet.error.value == "" and state["kept"]["stem"] == 8
    model = state["model"]
    # every member of the residual-coupled group has 8 channels; the other groups stay whole
    for name in ("stem", "bn", "block1.conv2", "block1.bn2"):
        assert width(model.get_submodule(name)) == 8, name
    assert model.block1.conv1.in_channels == 8 and model.block2.conv1.in_channels == 8
    assert (width(model.block1.conv1), width(model.block2.conv1), width(model.block2.shortcut.conv)) == (32, 64, 64)
    # the kept channels are the 8 ranked best, in their original order, with their original weights
    knob = resnet._knobs["stem"]
    kept = sorted(knob.order[:8])
    assert torch.equal(model.stem.weight, original.stem.weight[kept])
    assert torch.equal(model.block1.conv1.weight, original.block1.conv1.weight[:, kept])
    # the model shown is the one apply builds from the explorer's plan, and the user's model is untouched
    built = wb.apply(original, resnet.plan)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))
    assert state_bytes(original) == snapshot
    with torch.no_grad():
        assert model(resnet_task.eval_inputs[:4]).shape == (4, 10)


def test_sizes_and_flop_ratio_are_the_pruned_models_own(resnet, resnet_task):
    state = resnet.set_kept("block2.conv1", 16)
    model, result, example = state["model"], state["result"], resnet_task.example_input
    assert result["params"] == count_params(model) < count_params(resnet_task.model)
    assert result["bytes"] == payload_bytes(model)
    assert result["flops"] == count_flops(model, example)
    assert state["flop_ratio"] == pytest.approx(count_flops(model, example) / count_flops(resnet_task.model, example))
    assert state["result"]["metric"] == pytest.approx(resnet.engine.task.evaluate(model))
    assert set(state["latency"]) == {1, 8} and set(state["speedup"]) == {1, 8}
    for timings in state["latency"].values():
        assert set(timings) == {"original", "pruned"}
        assert all(t["q1_ms"] <= t["median_ms"] <= t["q3_ms"] for t in timings.values())
    assert "FLOP ratio" in resnet.table.value and "latency at batch 8" in resnet.table.value


def test_the_figure_follows_the_sliders_and_the_batch(resnet):
    before = resnet.view.widget.value
    state = resnet.set_kept("block1.conv1", 5)
    widths = [bar.get_width() for bar in resnet.kept_bars.kept]
    assert widths == [state["kept"][k.name] for k in resnet.knobs] and widths[1] == 5
    assert resnet.view.widget.value != before and resnet.view.widget.value[:4] == b"\x89PNG"
    image = resnet.view.widget.value
    assert resnet.set_batch(16)["batch"] == 16 and set(resnet.state["latency"]) == {1, 16}
    assert [t.get_text() for t in resnet.speed_bars.ax.get_xticklabels()] == ["batch 1", "batch 16"]
    assert "latency at batch 16" in resnet.table.value and resnet.view.widget.value != image
    promised = resnet.speed_bars.promised[0].get_height()
    assert promised == pytest.approx(1 / resnet.state["flop_ratio"])


def test_bad_values_change_nothing(resnet):
    resnet.set_kept("stem", 12)
    state, plan, image = resnet.state, resnet.plan, resnet.view.widget.value
    for group, kept, rule in (("stem", 0, "1..32"), ("stem", 33, "1..32"), ("stem", 2.5, "integer"),
                              ("stem", True, "integer"), ("fc", 3, "unknown group")):
        with pytest.raises(WorkbenchError, match=rule):
            resnet.set_kept(group, kept)
    with pytest.raises(WorkbenchError, match="batch=7 is not one of"):
        resnet.set_batch(7)
    resnet.request(stem=0)  # a value that reaches compute: one line on the error line
    assert "kept=0 for group 'stem' must be an integer in 1..32" in resnet.error.value
    assert resnet.state is state and resnet.plan == plan and resnet.view.widget.value == image
    assert resnet.sliders["stem"].value == 12


def test_plans_round_trip_and_the_recipe_plan_is_shown(resnet, resnet_task):
    recipe_plan = get_recipe("prune")(resnet_task.model, task=resnet_task, ratio=0.5, structured=True)
    resnet.set_plan(recipe_plan)
    assert resnet.kept() == {k.name: k.channels // 2 for k in resnet.knobs}
    built = wb.apply(resnet_task.model, recipe_plan)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), resnet.state["model"].state_dict().values()))
    shown = resnet.plan
    resnet.set_plan(Plan({}))
    assert resnet.kept() == {k.name: k.channels for k in resnet.knobs}
    resnet.set_plan(shown)
    assert resnet.plan == shown
    # plans the sliders cannot show are refused before any slider moves
    step = shown.steps[0]
    other = list(step["removed"])
    other[0] = tuple(sorted(set(range(32)) - set(other[0])))[:len(other[0])]  # some of the best channels
    for plan, rule in ((Plan({}, (step.with_params(removed=tuple(other)),)), "not the 16 lowest ranked"),
                       (Plan({}, (step.with_params(removed=(tuple(range(32)), *other[1:])),)), "removes all 32"),
                       (Plan({"fc": LayerPlan("svd", {"rank": 2})}), "sets layers"),
                       (Plan({}, (LayerPlan("prune_heads", {}),)), "not one these sliders make"),
                       (Plan({}, (step.with_params(roots=("fc", *step["roots"][1:])),)), "group 'fc'")):
        with pytest.raises(WorkbenchError, match=rule):
            resnet.set_plan(plan)
        assert resnet.plan == shown


@pytest.mark.parametrize("task_name, group, members_in", [
    ("digits-mlp", "fc1", ("fc2", "in_features")),
    ("digits-cnn", "conv2", ("fc1", "in_features")),
])
def test_mlp_and_cnn_channel_groups(task_name, group, members_in, mlp_task, cnn_task):
    task = {"digits-mlp": mlp_task, "digits-cnn": cnn_task}[task_name]
    snapshot = state_bytes(task.model)
    explorer = StructuredExplorer(task, synchronous=True, **FAST)
    knob = explorer._knobs[group]
    state = explorer.set_kept(group, knob.channels // 4)
    model = state["model"]
    assert width(model.get_submodule(group)) == knob.channels // 4
    reader, attr = members_in
    assert getattr(model.get_submodule(reader), attr) == getattr(task.model.get_submodule(reader), attr) // 4
    assert all(width(model.get_submodule(k.name)) == k.channels for k in explorer.knobs if k.name != group)
    assert state["result"]["params"] == count_params(model) and state_bytes(task.model) == snapshot
    assert state["flop_ratio"] < 1


def test_knobs_are_data(mlp_task):
    knobs = channel_knobs(mlp_task)
    assert [(k.name, k.channels, k.members) for k in knobs] == [("fc1", 256, ("fc1", "fc2")),
                                                                  ("fc2", 256, ("fc2", "fc3"))]
    # a knob made by hand (here: one group only, reversed ranking) drives the explorer alike
    worst_first = GroupKnob("fc2", 256, "channels", tuple(reversed(knobs[1].order)), knobs[1].members)
    explorer = StructuredExplorer(mlp_task, knobs=[worst_first], synchronous=True, **FAST)
    model = explorer.set_kept("fc2", 10)["model"]
    assert torch.equal(model.fc2.weight, mlp_task.model.fc2.weight[sorted(knobs[1].order[-10:])])
    assert list(explorer.sliders) == ["fc2"] and model.fc1.out_features == 256
    with pytest.raises(WorkbenchError, match="kind='rows'"):
        GroupKnob("fc2", 4, "rows", (0, 1, 2, 3))
    with pytest.raises(WorkbenchError, match="rank each of its 4 units once"):
        GroupKnob("fc2", 4, "heads", (0, 1, 1, 3))
    with pytest.raises(WorkbenchError, match=r"no step is registered .*'prune_rows'"):
        StructuredExplorer(mlp_task, knobs=[GroupKnob("h", 2, "heads", (0, 1), method="prune_rows")],
                           synchronous=True, **FAST)
    with pytest.raises(WorkbenchError, match="batch=4 is not one of"):
        StructuredExplorer(mlp_task, knobs=knobs, synchronous=True, **{**FAST, "batch": 4})


def test_slider_moves_are_computed_and_drawn_on_the_worker(mlp_task):
    explorer = StructuredExplorer(mlp_task, **FAST)  # not synchronous
    threads, draw = [], explorer.view.draw
    explorer.view.draw = lambda moving=(): (threads.append(threading.current_thread().name), draw(moving))
    for kept in (200, 150, 100, 64):
        explorer.sliders["fc1"].value = kept
    state = explorer.wait(120)
    assert explorer.error.value == "" and state["kept"]["fc1"] == 64  # ends on what the slider shows
    assert state["model"].fc1.out_features == 64
    assert set(threads) == {"workbench-coalescer"}
    assert np.isclose(explorer.kept_bars.kept[0].get_width(), 64)


def test_save_and_load_restore_the_sliders_and_batch(mlp_task, tmp_path):
    def make():
        return StructuredExplorer(mlp_task, synchronous=True, **FAST)

    explorer = make()
    explorer.set_kept("fc1", 40)
    explorer.set_kept("fc2", 100)
    explorer.set_batch(16)
    bar = explorer.persistence
    bar.folder, bar.path.value = tmp_path, "s.json"
    assert bar.save(), bar.status.value
    fresh = make()
    fresh.persistence.folder, fresh.persistence.path.value = tmp_path, "s.json"
    assert fresh.persistence.load(), fresh.persistence.status.value
    assert fresh.kept() == {"fc1": 40, "fc2": 100} and fresh.batch.value == 16
    assert fresh.plan == explorer.plan and fresh.state["result"]["metric"] == explorer.state["result"]["metric"]
    assert fresh.state["model"].fc1.out_features == 40 and fresh.state["model"].fc2.out_features == 100
