"""The user's own models: modules, state_dict / safetensors / TorchScript files, safe loading,
their data and metric, skipped and tied layers, and clear errors for bad input."""
from collections import OrderedDict

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.measure import count_params
from workbench.registry import get_recipe
from workbench.zoo.user import LOAD_OPTIONS
from tests.conftest import state_bytes


def small_net() -> nn.Module:
    return nn.Sequential(OrderedDict([("fc1", nn.Linear(12, 32)), ("act", nn.ReLU()),
                                      ("fc2", nn.Linear(32, 4))]))


class Mixed(nn.Module):
    """Embedding + norm + grouped conv + a custom parameter + tied Linear pair."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.group = nn.Conv2d(4, 4, 3, groups=2)
        self.scale = nn.Parameter(torch.ones(8))
        self.enc = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8)
        self.dec.weight = self.enc.weight          # tied
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.norm(self.embed(ids)) * self.scale
        return self.head(self.dec(torch.relu(self.enc(h))).mean(1))


class Evil:
    """Unpickling this would create a file (``open(path, 'w')``): a stand-in for malicious code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 12, generator=g), torch.randint(4, (64,), generator=g)


def accuracy(outputs, targets):
    return float((outputs.argmax(1) == targets).float().mean())


def test_module_with_user_metric_and_fallback_fidelity(data):
    x, y = data
    net = small_net()
    before = state_bytes(net)
    task = wb.load(net, eval_data=(x, y), metric=accuracy)
    assert task.metric_name == "accuracy" and task.evaluate() == accuracy(net(x), y)
    fallback = wb.load(net, eval_data=x)
    assert fallback.evaluate() == pytest.approx(1.0)
    compressed = wb.apply(net, get_recipe("svd")(net, ratio=0.3))
    assert fallback.evaluate(compressed) < 1.0
    assert state_bytes(net) == before


def test_dataloader_eval_data(data):
    x, y = data
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    task = wb.load(small_net(), eval_data=loader, metric=accuracy)
    assert torch.equal(task.eval_inputs, x) and torch.equal(task.eval_targets, y)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_files_with_named_constructor(tmp_path, data, suffix):
    net = small_net()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(net.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(net.state_dict(), str(path))
    task = wb.load(path, constructor=small_net, eval_data=data[0])
    torch.testing.assert_close(task.model(data[0]), net(data[0]))
    by_name = wb.load(str(path), constructor="tests.test_user_models:small_net", eval_data=data[0])
    torch.testing.assert_close(by_name.model(data[0]), net(data[0]))


def test_torchscript_file(tmp_path, data):
    net = small_net()
    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    task = wb.load(path, eval_data=data[0])
    torch.testing.assert_close(task.model(data[0]), net(data[0]))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path, data):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "model.pt"
    torch.save({"weights": Evil(marker)}, path)
    assert not marker.exists()
    with pytest.raises(WorkbenchError, match="refused.*weights_only=True"):
        wb.load(path, constructor=small_net, eval_data=data[0])
    assert not marker.exists()


def test_whole_pickled_model_is_refused(tmp_path, data):
    path = tmp_path / "whole.pt"
    torch.save(small_net(), path)
    with pytest.raises(WorkbenchError, match="refused"):
        wb.load(path, constructor=small_net, eval_data=data[0])


def test_bad_files_and_data_give_clear_errors(tmp_path, data):
    net = small_net()
    good = tmp_path / "w.pt"
    torch.save(net.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    text = tmp_path / "notes.pt"
    text.write_text("just some notes")
    for path in (truncated, text):
        with pytest.raises(WorkbenchError, match="not a model file"):
            wb.load(path, constructor=small_net, eval_data=data[0])
    with pytest.raises(WorkbenchError, match="constructor="):
        wb.load(good, eval_data=data[0])

    def wider():
        return nn.Sequential(OrderedDict([("fc1", nn.Linear(12, 48)), ("act", nn.ReLU()),
                                          ("fc2", nn.Linear(48, 4)), ("fc3", nn.Linear(4, 2))]))
    with pytest.raises(WorkbenchError, match=r"missing in the file: fc3.bias.*fc1.weight: file \(32, 12\) vs model \(48, 12\)"):
        wb.load(good, constructor=wider, eval_data=data[0])
    with pytest.raises(WorkbenchError, match=r"eval_data of shape \(64, 5\) \(torch.float32\) does not fit"):
        wb.load(net, eval_data=torch.randn(64, 5))
    with pytest.raises(WorkbenchError, match="eval_data"):
        wb.load(net)
    with pytest.raises(WorkbenchError, match="unknown model 'nope'"):
        wb.load("nope")
    assert good.read_bytes()[:100] == truncated.read_bytes()  # the user's files are untouched


def test_skipped_layers_have_reasons_and_tied_weights_are_never_duplicated():
    model = Mixed()
    ids = torch.randint(10, (16, 5))
    task = wb.load(model, eval_data=ids)
    reasons = {row["name"]: row["reason"] for row in task.extras["skipped"]}
    assert "embedding" in reasons["embed"] and "normalisation" in reasons["norm"]
    assert "grouped conv" in reasons["group"] and "Mixed" in reasons["(model)"]
    assert "enc" not in reasons and "dec" not in reasons   # the tied pair is offered as one group
    assert [info.name for info in matrix_layers(model)] == ["head"]
    plan = get_recipe("svd")(model, ratio=0.5)
    assert set(plan.layers) == {"head", "enc", "dec"} and plan.layers["enc"] == plan.layers["dec"]
    new = wb.apply(model, plan)
    assert new.enc.core is new.dec.core              # one factorization for the shared weight
    assert count_params(new) <= count_params(model)


# ---- the metric is finite or refused ---------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_infinite_metric_is_refused_naming_it(data, bad):
    x, y = data
    net = small_net()

    def broken(outputs, targets):
        return bad

    with pytest.raises(WorkbenchError, match=rf"metric 'broken' is {bad} for the original model: a metric must be a finite"):
        wb.load(net, eval_data=(x, y), metric=broken)

    def only_original(outputs, targets):   # finite on the original, not on anything else
        return accuracy(outputs, targets) if torch.equal(outputs, net(x)) else bad

    task = wb.load(net, eval_data=(x, y), metric=only_original, metric_name="fragile")
    compressed = wb.apply(net, get_recipe("svd")(net, ratio=0.3))
    with pytest.raises(WorkbenchError, match=rf"metric 'fragile' is {bad}"):
        task.evaluate(compressed)
    with pytest.raises(WorkbenchError, match=rf"metric 'fragile' is {bad}"):   # the engine's path too
        wb.Engine(task, preview=False).evaluate(get_recipe("svd")(net, ratio=0.3))


def test_a_metric_that_is_not_a_number_is_refused(data):
    with pytest.raises(WorkbenchError, match="metric 'words' returned str, not a number"):
        wb.load(small_net(), eval_data=data, metric=lambda o, t: "good", metric_name="words")


def test_user_metric_direction(data):
    x, y = data

    def loss(outputs, targets):
        return float(torch.nn.functional.cross_entropy(outputs, targets))

    task = wb.load(small_net(), eval_data=(x, y), metric=loss, higher_is_better=False)
    assert task.higher_is_better is False and task.better(0.1, 0.2) and not task.better(0.2, 0.1)
    assert wb.load(small_net(), eval_data=(x, y), metric=accuracy).better(0.9, 0.8)
    with pytest.raises(WorkbenchError, match="higher_is_better=False must be True or False and goes with your metric="):
        wb.load(small_net(), eval_data=x, higher_is_better=False)


# ---- the user's model is left as it was ------------------------------------------------------

def test_load_and_evaluate_keep_the_users_modes(data):
    x, y = data
    net = nn.Sequential(OrderedDict([("fc1", nn.Linear(12, 32)), ("drop", nn.Dropout(0.5)),
                                     ("fc2", nn.Linear(32, 4))]))
    net.train()
    net.fc2.eval()                                   # a mixed state: training, one part frozen
    modes = {name: m.training for name, m in net.named_modules()}
    task = wb.load(net, eval_data=(x, y), metric=accuracy)
    fidelity = wb.load(net, eval_data=x)
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert fidelity.evaluate() == pytest.approx(1.0)   # judged in eval mode: dropout off
    task.evaluate(), task.outputs(), fidelity.evaluate(wb.apply(net, get_recipe("svd")(net, ratio=0.5)))
    assert {name: m.training for name, m in net.named_modules()} == modes
    net.eval()
    assert task.evaluate() == accuracy(net(x), y)


def test_models_built_from_files_are_in_eval_mode(tmp_path, data):
    path = tmp_path / "w.pt"
    torch.save(small_net().state_dict(), path)
    assert not wb.load(path, constructor=small_net, eval_data=data[0]).model.training


# ---- the user's data: training and calibration -------------------------------------------------

def test_train_data_fills_the_training_split_and_finetuning_runs(data):
    x, y = data
    g = torch.Generator().manual_seed(3)
    xt, yt = torch.randn(96, 12, generator=g), torch.randint(4, (96,), generator=g)
    net = small_net()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=32)
    task = wb.load(net, eval_data=(x, y), train_data=loader, metric=accuracy)
    assert torch.equal(task.train_inputs, xt) and torch.equal(task.train_targets, yt)
    assert torch.equal(task.calibration_inputs(), xt)            # training inputs, not the test split
    small = wb.apply(net, get_recipe("svd")(net, ratio=0.3))
    before = state_bytes(small)
    run = wb.finetune(small, task, epochs=1, progress=False)
    assert len(run.history) == 1 and 0.0 <= run.history[0]["metric"] <= 1.0
    assert run.model is not small and state_bytes(small) == before


def test_train_data_without_labels_targets_the_originals_outputs(data):
    x, _ = data
    xt = torch.randn(40, 12, generator=torch.Generator().manual_seed(4))
    net = small_net()
    task = wb.load(net, eval_data=x, train_data=xt)
    with torch.no_grad():
        torch.testing.assert_close(task.train_targets, net(xt))
    run = wb.finetune(wb.apply(net, get_recipe("svd")(net, ratio=0.3)), task, epochs=1, progress=False)
    assert run.history[0]["metric"] <= 1.0 + 1e-9                 # fidelity to the original on held-out train


def test_calibration_data_feeds_data_aware_methods(data):
    x, y = data
    calib = torch.randn(20, 12, generator=torch.Generator().manual_seed(5))
    task = wb.load(small_net(), eval_data=(x, y), metric=accuracy, train_data=(x[:30], y[:30]), calibration_data=calib)
    assert torch.equal(task.calibration_inputs(), calib) and torch.equal(task.calibration_inputs(7), calib[:7])
    assert torch.equal(wb.load(small_net(), eval_data=x).calibration_inputs(), x)   # nothing else given


# ---- bad input: one clear line each, nothing modified ------------------------------------------

class NeedsMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x, mask, *, scale):
        return self.fc(x * mask) * scale


def test_bad_input_is_refused_in_one_line_and_changes_nothing(data):
    x, y = data
    net = small_net().train()
    before = state_bytes(net)
    cases = [
        (dict(eval_data=x, evl_data=x), r"unknown option\(s\) evl_data for load\(\); accepted: constructor, eval_data, "
                                        r"train_data, calibration_data, metric"),
        (dict(eval_data=x, train_data=torch.randn(8, 5)), r"train_data of shape \(8, 5\) \(torch.float32\) does not fit"),
        (dict(eval_data=x, calibration_data=torch.randn(8, 3)), r"calibration_data of shape \(8, 3\)"),
        (dict(eval_data=x, train_data=(x, y[:10])), r"train_data inputs have 64 samples but targets 10"),
        (dict(eval_data=x, metric=accuracy), r"metric=accuracy needs targets: give eval_data=\(inputs, targets\)"),
        (dict(eval_data=x, output="logits"), r"output='logits' names an entry, but the model returns a tensor \(1, 4\)"),
        (dict(eval_data=x[:0]), r"eval_data holds no samples"),
        (dict(eval_data={"x": x}), r"eval_data must be a DataLoader, a tensor or an \(inputs, targets\) pair; got dict"),
    ]
    for options, message in cases:
        with pytest.raises(WorkbenchError, match=message) as caught:
            wb.load(net, **options)
        assert "\n" not in str(caught.value)
    assert net.training and state_bytes(net) == before
    with pytest.raises(WorkbenchError, match=r"NeedsMask.forward needs 'mask', 'scale' besides the input, which the data "
                                             r"does not give"):
        wb.load(NeedsMask(), eval_data=x)


def test_load_options_are_the_documented_ones():
    assert LOAD_OPTIONS == ("constructor", "eval_data", "train_data", "calibration_data", "metric", "metric_name",
                            "higher_is_better", "output", "name", "texts", "tokenizer")
