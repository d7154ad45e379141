"""ONNX export of factorized, structurally pruned and int8 models, checked in onnxruntime."""
import copy
import warnings

import onnx
import onnx.numpy_helper
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.export.onnx_format import (Int8WeightLinear, export_onnx, onnx_max_error, onnx_outputs,
                                   prepare_for_onnx)
from workbench.plan import LayerPlan, Plan

TOLERANCE = 1e-4


def predictions(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def test_factorized_mlp_matches_pytorch_and_is_smaller(mlp_task, tmp_path):
    plan = Plan({"fc1": LayerPlan("svd", {"rank": 8}), "fc2": LayerPlan("svd", {"rank": 16})})
    model = wb.apply(mlp_task.model, plan)
    written = export_onnx(model, mlp_task.example_input, tmp_path / "svd.onnx")
    x = mlp_task.eval_inputs[:100]  # batch 100 while the export traced batch 2: the batch axis is dynamic
    assert onnx_max_error(written.path, model, x) < TOLERANCE
    dense = export_onnx(mlp_task.model, mlp_task.example_input, tmp_path / "dense.onnx")
    removed_floats = (64 * 256 - 8 * (64 + 256)) + (256 * 256 - 16 * 512)
    assert dense.bytes - written.bytes >= removed_floats * 4 - 4096  # minus a few more graph nodes
    print(f"ONNX sizes: dense {dense.bytes} B, factorized {written.bytes} B ({written.exporter})")


def test_factorized_conv_matches_pytorch(cnn_task, tmp_path):
    plan = Plan({"conv2": LayerPlan("svd", {"rank": 8})})
    model = wb.apply(cnn_task.model, plan)
    written = export_onnx(model, cnn_task.example_input, tmp_path / "cnn.onnx")
    assert onnx_max_error(written.path, model, cnn_task.eval_inputs[:20]) < TOLERANCE
    convs = [n for n in onnx.load(str(written.path)).graph.node if n.op_type == "Conv"]
    assert len(convs) == 3  # conv1 + the two factor convs of conv2


def structurally_pruned(model: nn.Sequential, keep: int) -> nn.Sequential:
    """Remove all but the ``keep`` largest-norm hidden neurons of fc1 (rows of fc1, columns of fc2)."""
    pruned = copy.deepcopy(model)
    rows = model.fc1.weight.norm(dim=1).topk(keep).indices.sort().values
    fc1, fc2 = nn.Linear(64, keep), nn.Linear(keep, model.fc2.out_features)
    with torch.no_grad():
        fc1.weight.copy_(model.fc1.weight[rows]), fc1.bias.copy_(model.fc1.bias[rows])
        fc2.weight.copy_(model.fc2.weight[:, rows]), fc2.bias.copy_(model.fc2.bias)
    pruned.fc1, pruned.fc2 = fc1, fc2
    return pruned


def test_structurally_pruned_model_matches_pytorch(mlp_task, tmp_path):
    model = structurally_pruned(mlp_task.model, 96)
    written = export_onnx(model, mlp_task.example_input, tmp_path / "pruned.onnx", exporter="legacy")
    assert written.exporter == "legacy"
    assert onnx_max_error(written.path, model, mlp_task.eval_inputs[:64]) < TOLERANCE
    shapes = {tuple(i.dims) for i in onnx.load(str(written.path)).graph.initializer}
    assert (96, 64) in shapes or (64, 96) in shapes  # the removed neurons are gone from the file


def test_registered_structured_pruning_exports(mlp_task, tmp_path):
    from workbench.registry import get_recipe, recipes
    if "prune" not in recipes():
        pytest.skip("no 'prune' recipe registered yet")
    try:
        plan = get_recipe("prune")(mlp_task.model, task=mlp_task, ratio=0.5, structured=True)
    except WorkbenchError as exc:
        pytest.skip(f"structured pruning not offered for digits-mlp: {exc}")
    model = wb.apply(mlp_task.model, plan, calibration_inputs=mlp_task.calibration_inputs())
    written = export_onnx(model, mlp_task.example_input, tmp_path / "pruned.onnx")
    assert onnx_max_error(written.path, model, mlp_task.eval_inputs[:64]) < TOLERANCE


def test_torch_ao_int8_exports_as_int8_initializers(mlp_task, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(mlp_task.model, {nn.Linear}, dtype=torch.qint8)
    written = export_onnx(quantized, mlp_task.example_input, tmp_path / "int8.onnx")
    graph = onnx.load(str(written.path)).graph
    int8 = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert sorted(a.shape for a in int8 if a.ndim == 2 and a.shape[1] > 1) == [(10, 256), (256, 64), (256, 256)]
    x = mlp_task.eval_inputs
    # Exact against the weight-only int8 twin (same codes and scales) ...
    twin = prepare_for_onnx(quantized)
    assert isinstance(twin.fc2, Int8WeightLinear)
    assert onnx_max_error(written.path, twin, x[:128]) < TOLERANCE
    # ... and close to torch.ao's dynamic int8, which also rounds the activations.
    agree = (onnx_outputs(written.path, x).argmax(1) == predictions(quantized, x)).float().mean()
    assert agree > 0.97
    dense = export_onnx(mlp_task.model, mlp_task.example_input, tmp_path / "dense.onnx", exporter="legacy")
    assert written.bytes < dense.bytes / 3
    print(f"ONNX sizes: float {dense.bytes} B, int8 {written.bytes} B")


def test_registered_int8_layers_export(mlp_task, tmp_path):
    plan = wb.recipe("int8")(mlp_task.model, task=mlp_task)
    model = wb.apply(mlp_task.model, plan, calibration_inputs=mlp_task.calibration_inputs())
    written = export_onnx(model, mlp_task.example_input, tmp_path / "q.onnx")
    x = mlp_task.eval_inputs[:256]
    agree = (onnx_outputs(written.path, x).argmax(1) == predictions(model, x)).float().mean()
    assert agree > 0.97


def test_unknown_exporter_is_refused(mlp_task, tmp_path):
    with pytest.raises(WorkbenchError, match="exporter='torchscript' must be"):
        export_onnx(mlp_task.model, mlp_task.example_input, tmp_path / "m.onnx", exporter="torchscript")


def test_model_that_cannot_export_is_a_clear_error_and_leaves_no_file(tmp_path):
    class Opaque(nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x).S  # no ONNX operator computes an SVD

    with pytest.raises(WorkbenchError, match="ONNX export of Opaque failed; dynamo: .*; legacy: "):
        export_onnx(Opaque(), torch.randn(1, 3), tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []
