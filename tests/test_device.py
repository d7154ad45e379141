"""A model's tensors decide where (and in which dtype) the work runs: `workbench.device` and the
paths that follow it. The CPU cannot show a GPU, so two stand-ins carry the oracle here: the
``meta`` device (tensors with shapes and no data: whatever is computed there was computed on the
model's device, not on the CPU where the data came from) and float64 (a model in float64 stays
float64 through apply and the engine). The real GPU check runs where CUDA is present."""
import collections
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.device import model_device, synchronize, to_device
from workbench.hooks import collect_layer_inputs
from workbench.kernels import aware as aware_kernels
from workbench.kernels import prune as prune_kernels
from workbench.kernels import svd as svd_kernels
from workbench.layers.lowrank import LowRankLinear
from workbench.measure import count_flops

META = torch.device("meta")


def _device_check():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the helpers ---------------------------------------------------------------------------------

def test_model_device_is_the_first_parameter_then_buffer_then_cpu():
    assert model_device(nn.Linear(3, 2, device="meta")) == META
    only_buffers = nn.BatchNorm1d(4, affine=False, device="meta")
    assert list(only_buffers.parameters()) == [] and model_device(only_buffers) == META
    assert model_device(nn.ReLU()) == torch.device("cpu")  # no tensors at all
    mixed = nn.Linear(3, 2)
    mixed.register_buffer("scale", torch.ones(2, device="meta"))
    assert model_device(mixed) == torch.device("cpu")  # a parameter comes before a buffer


def test_to_device_moves_nested_tensors_and_keeps_the_rest():
    Pair = collections.namedtuple("Pair", "a b")
    x, y = torch.ones(2), torch.zeros(3, dtype=torch.long)
    value = {"ids": x, "more": [y, (x, 7)], "pair": Pair(x, "name"), "ordered": collections.OrderedDict(k=y)}
    moved = to_device(value, "meta")
    assert moved["ids"].device == META and moved["ids"].shape == (2,)
    assert moved["more"][0].device == META and moved["more"][0].dtype == torch.long
    assert isinstance(moved["more"][1], tuple) and moved["more"][1][1] == 7
    assert isinstance(moved["pair"], Pair) and moved["pair"].a.device == META and moved["pair"].b == "name"
    assert isinstance(moved["ordered"], collections.OrderedDict) and moved["ordered"]["k"].device == META
    assert value["ids"] is x and value["more"][0] is y  # the given containers are not changed
    assert to_device(x, "cpu") is x and to_device(None, "meta") is None  # already there: no copy


def test_synchronize_is_a_no_op_on_the_cpu():
    assert synchronize("cpu") is None and synchronize(torch.device("cpu")) is None


# ---- the work follows the model's device (meta stands in for a GPU) ------------------------------

def test_layer_inputs_and_flops_run_on_the_model_device_with_data_from_the_cpu():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to("meta")
    inputs = torch.randn(5, 4)  # on the CPU, as a task's data
    captured = collect_layer_inputs(model, ["2"], inputs, batch_size=2)["2"]
    assert captured.device == META and captured.shape == (5, 3)
    assert count_flops(model, inputs[:1]) == 2 * (4 * 3 + 3 * 2)


def test_kernels_and_builders_compute_on_the_weight_device():
    w = torch.randn(6, 4, device="meta")
    assert all(t.device == META for t in svd_kernels.truncate(w, 2))
    assert aware_kernels.gram(torch.randn(10, 4, device="meta")).device == META
    assert prune_kernels.mask_by_ratio(w, 0.5).device == META
    layer = LowRankLinear.from_linear(nn.Linear(4, 6, device="meta", dtype=torch.float64), 2)
    assert {(p.device, p.dtype) for p in layer.parameters()} == {(META, torch.float64)}


# ---- float64 stays float64 (the CPU-side oracle of "follows the model's tensors") ----------------

def test_a_float64_model_stays_float64_through_apply_and_the_engine(mlp_task):
    model = copy.deepcopy(mlp_task.model).double()
    task = wb.load(model, eval_data=(mlp_task.eval_inputs.double(), mlp_task.eval_targets),
                   train_data=(mlp_task.train_inputs.double(), mlp_task.train_targets),
                   metric=mlp_task.metric, metric_name="accuracy")
    plan = wb.Plan({"fc1": wb.LayerPlan("svd", {"rank": 6}), "fc2": wb.LayerPlan("svd_aware", {"rank": 12})})
    built = wb.apply(task.model, plan, calibration_inputs=task.calibration_inputs())
    assert {p.dtype for p in built.parameters()} == {torch.float64}
    assert type(built.fc1).__name__ == "LowRankLinear" and built.fc1.first.weight.shape == (6, 64)
    engine = wb.Engine(task, freeze_gc=False)
    assert engine.factors.get("fc1").u.dtype == torch.float64
    assert engine.evaluate(plan)["metric"] == task.evaluate(built)  # the engine's view = the built model
    # float64 factors differ from the float32 model's: the dtype really was followed
    single = wb.apply(mlp_task.model, plan, calibration_inputs=mlp_task.calibration_inputs())
    assert single.fc1.first.weight.dtype == torch.float32
    assert not torch.equal(single.fc1.first.weight.double(), built.fc1.first.weight)


# ---- the device check's paths on the CPU, and on CUDA where there is one -------------------------

def test_the_device_check_paths_run_on_the_cpu():
    check = _device_check()
    figures = check.run("cpu")
    task = wb.load("digits-mlp")
    assert figures["digits-mlp/svd/metric"] == task.evaluate(wb.apply(task.model, wb.Plan(check.MLP_PLANS["svd"])))
    assert 0.9 < figures["digits-mlp/engine_svd_metric"] <= 1.0 and 0.99 < figures["bert-tiny/engine_svd_metric"] < 1.0
    assert figures["digits-mlp/latency_ms"] > 0 and figures["bert-tiny/latency_ms"] > 0
    assert check.compare(figures, figures, 360) == []
    shifted = {**figures, "digits-mlp/svd/metric": figures["digits-mlp/svd/metric"] - 0.01}
    assert [line.split(":")[0] for line in check.compare(shifted, figures, 360)] == ["digits-mlp/svd/metric"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_main_paths_on_cuda_give_the_cpu_metrics():
    check = _device_check()
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 as on the CPU
    try:
        gpu, cpu = check.run("cuda"), check.run("cpu")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert check.compare(gpu, cpu, len(wb.load("digits-mlp").eval_inputs)) == []
