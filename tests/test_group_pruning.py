"""Group-level structured pruning (``prune_groups``) on the residual digits-resnet: coupled channels
go together, the kept fraction is exact per group, plans rebuild bit-exactly, bad input refused."""
import json

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.export import load_compressed, save_compressed
from workbench.methods.group_pruning import kept_counts
from workbench.methods.pruning import pruning_report
from workbench.recovery import finetune
from workbench.registry import get_recipe

from conftest import state_bytes

# the coupled groups of digits-resnet: every conv's output channels and the BatchNorms that share them
GROUPS = {
    "stem": ["stem", "bn", "block1.conv2", "block1.bn2"],  # coupled by block1's identity add
    "block1.conv1": ["block1.conv1", "block1.bn1"],
    "block2.conv1": ["block2.conv1", "block2.bn1"],
    "block2.shortcut.conv": ["block2.shortcut.conv", "block2.shortcut.bn", "block2.conv2", "block2.bn2"],
}


@pytest.fixture(scope="module")
def resnet_task():
    return wb.load("digits-resnet")


def width(module):
    return {nn.Conv2d: lambda m: m.out_channels, nn.BatchNorm2d: lambda m: m.num_features,
            nn.Linear: lambda m: m.out_features}[type(module)](module)


def conv_params(c, model):
    """Closed form of the convs' weights for the channel counts ``c = (stem, b1, b2, b2out)``."""
    stem, b1, b2, out = c
    return 9 * stem + 9 * stem * b1 + 9 * b1 * stem + 9 * stem * b2 + 9 * b2 * out + stem * out


def counts(model):
    return tuple(width(model.get_submodule(n)) for n in GROUPS)


def test_half_of_every_coupled_group_and_the_residuals_line_up(resnet_task):
    model = resnet_task.model
    before = state_bytes(model)
    plan = get_recipe("prune")(model, task=resnet_task, ratio=0.5, structured=True)
    pruned = wb.apply(model, plan)
    for root, members in GROUPS.items():
        full = width(model.get_submodule(root))
        assert {width(pruned.get_submodule(n)) for n in members} == {full // 2}, root
    assert pruned.fc.in_features == 32 and pruned.fc.out_features == 10
    x = resnet_task.eval_inputs[:16]
    with torch.no_grad():
        assert pruned(x).shape == (16, 10)
    # every conv weight counts in_channels x out_channels: halving both leaves a quarter
    assert counts(model) == (32, 32, 64, 64) and counts(pruned) == (16, 16, 32, 32)
    convs = lambda m: sum(c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv2d))  # noqa: E731
    assert convs(model) == conv_params((32, 32, 64, 64), model)
    assert convs(pruned) == conv_params((16, 16, 32, 32), pruned)
    assert convs(pruned) == pytest.approx(convs(model) / 4, rel=0.01)
    assert state_bytes(model) == before  # the user's model untouched
    report = pruning_report(model, pruned, resnet_task, plan)
    rows = {row["root"]: (row["channels_before"], row["channels_after"]) for row in report["groups"]}
    assert rows == {root: (width(model.get_submodule(root)), width(model.get_submodule(root)) // 2) for root in GROUPS}
    assert plan == wb.Plan.from_json(plan.to_json())


def test_round_to_and_kept_counts():
    scores = [torch.arange(32.0), torch.arange(64.0), torch.arange(10.0)]
    assert kept_counts(scores, 0.3) == [10, 19, 3]  # round(0.3 * C)
    assert kept_counts(scores, 0.3, round_to=8) == [8, 16, 8]  # nearest multiple of 8, at least 8
    assert kept_counts(scores, 0.6, round_to=8) == [16, 40, 8]  # 19.2 -> 16, 38.4 -> 40, 6 -> 8
    assert kept_counts([torch.arange(4.0)], 0.6, round_to=8) == [4]  # at most the group's channels


def test_round_to_on_the_model(resnet_task):
    plan = get_recipe("prune")(resnet_task.model, task=resnet_task, ratio=0.4, structured=True, round_to=8)
    pruned = wb.apply(resnet_task.model, plan)
    assert counts(pruned) == (16, 16, 24, 24)  # 12.8 -> 16, 25.6 -> 24


def test_global_ranking_respects_max_ratio(resnet_task):
    # group 0 scores far below the others: a free global cut would empty it
    scores = [torch.full((32,), 0.01), torch.arange(1.0, 65.0)]
    assert kept_counts(scores, 0.5, global_ranking=True, max_ratio=0.75) == [8, 40]  # 48 kept, group 0 at its floor
    assert sum(kept_counts(scores, 0.5, global_ranking=True, max_ratio=0.99)) == 48
    plan = get_recipe("prune")(resnet_task.model, task=resnet_task, ratio=0.5, structured=True,
                               global_ranking=True, max_ratio=0.7)
    pruned = wb.apply(resnet_task.model, plan)
    kept = counts(pruned)
    assert sum(kept) == 96  # half of 192 channels in total
    assert all(k >= 0.3 * c for k, c in zip(kept, (32, 32, 64, 64)))
    with torch.no_grad():
        assert pruned(resnet_task.eval_inputs[:4]).shape == (4, 10)


def test_magnitude_and_taylor_choose_different_valid_channels(resnet_task):
    plans = {imp: get_recipe("prune")(resnet_task.model, task=resnet_task, ratio=0.5, structured=True, importance=imp)
             for imp in ("magnitude", "taylor")}
    assert plans["magnitude"].steps[0]["removed"] != plans["taylor"].steps[0]["removed"]
    for plan in plans.values():
        pruned = wb.apply(resnet_task.model, plan)
        assert counts(pruned) == (16, 16, 32, 32)
        # half of every group gone, BatchNorm statistics stale: near chance until one epoch of fine-tuning
        recovered = finetune(pruned, resnet_task, epochs=1, progress=False, patience=None).model
        assert resnet_task.evaluate(recovered) > 0.8


def test_save_load_round_trip_is_bit_exact(resnet_task, tmp_path):
    plan = get_recipe("prune")(resnet_task.model, task=resnet_task, ratio=0.5, structured=True, importance="taylor")
    pruned = wb.apply(resnet_task.model, plan)
    path = save_compressed(tmp_path / "r.safetensors", pruned, plan, "digits-resnet")
    loaded = load_compressed(path)
    assert loaded.plan == plan
    assert state_bytes(loaded.model) == state_bytes(pruned)
    x = resnet_task.eval_inputs[:32]
    with torch.no_grad():
        assert torch.equal(loaded.model(x), pruned.eval()(x))


def test_bad_input_is_refused_with_nothing_applied(resnet_task):
    model, recipe = resnet_task.model, get_recipe("prune")
    before = state_bytes(model)
    for ratio in (0, -0.5, 1.5):
        with pytest.raises(WorkbenchError, match=f"ratio={ratio}"):
            recipe(model, task=resnet_task, ratio=ratio, structured=True)
    with pytest.raises(WorkbenchError, match="keeps 0 of the 32 channels of the group rooted at 'stem'"):
        recipe(model, task=resnet_task, ratio=0.01, structured=True)
    with pytest.raises(WorkbenchError, match="importance='fisher' is not one of magnitude, taylor, hessian"):
        recipe(model, task=resnet_task, ratio=0.5, structured=True, importance="fisher")
    with pytest.raises(WorkbenchError, match="round_to=0"):
        recipe(model, task=resnet_task, ratio=0.5, structured=True, round_to=0)
    with pytest.raises(WorkbenchError, match="max_ratio=1"):
        recipe(model, task=resnet_task, ratio=0.5, structured=True, global_ranking=True, max_ratio=1)
    with pytest.raises(WorkbenchError, match="importance='taylor' needs calibration inputs and class labels"):
        recipe(model, ratio=0.5, structured=True, importance="taylor", input_shape=(1, 64))
    with pytest.raises(WorkbenchError, match="produces the model's outputs"):
        recipe(model, task=resnet_task, ratio=0.5, structured=True, layers=["fc"])
    # a hand-edited plan removing a whole group: refused before any group is pruned
    plan = recipe(model, task=resnet_task, ratio=0.5, structured=True)
    data = json.loads(plan.to_json())
    data["steps"][0]["removed"][-1] = list(range(64))
    with pytest.raises(WorkbenchError, match="would remove the whole group"):
        wb.apply(model, wb.Plan.from_dict(data))
    assert state_bytes(model) == before


def test_cli_reports_each_group_and_takes_the_group_options(capsys):
    from workbench.cli import main

    assert main(["compress", "digits-resnet", "--method", "prune", "--structured", "--ratio", "0.4",
                 "--round-to", "8", "--importance", "taylor", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {row["root"]: (row["channels_before"], row["channels_after"]) for row in result["groups"]} == {
        "stem": (32, 16), "block1.conv1": (32, 16), "block2.conv1": (64, 24), "block2.shortcut.conv": (64, 24)}
    assert result["plan"]["steps"][0]["importance"] == "taylor"
    with pytest.raises(SystemExit):
        main(["compress", "digits-resnet", "--method", "prune", "--structured", "--ratio", "0.5",
              "--importance", "fisher"])
