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
    with pytest.raises(WorkbenchError, match=r"evaluation data of shape \(64, 5\) does not fit"):
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
    assert "tied" in reasons["enc"] and "tied" in reasons["dec"]
    assert [info.name for info in matrix_layers(model)] == ["head"]
    plan = get_recipe("svd")(model, ratio=0.5)
    assert set(plan.layers) <= {"head"}
    new = wb.apply(model, plan)
    assert new.enc.weight is new.dec.weight          # still one shared tensor
    assert count_params(new) <= count_params(model)
