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
from workbench.export.onnx_layers import onnx_twin
from workbench.export.onnx_qdq import integer_kernels
from workbench.layers.recurrent import LowRankRNN
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


# -- exports stay honest: compact forms, never larger than the original's ONNX file ----------------

HONEST_CASES = [("svd", {"ratio": 0.5}), ("prune", {"ratio": 0.5}), ("quant", {"bits": 4}), ("int8", {}),
                ("gptq", {"bits": 4}), ("gptq", {"bits": 3, "group_size": 32}), ("gptq", {"bits": 4, "awq": True}),
                ("svd_quant", {"ratio": 0.25, "bits": 4}), ("svd_residual", {"ratio": 0.25, "bits": 4})]


@pytest.mark.parametrize("method,options", HONEST_CASES, ids=lambda v: str(v))
def test_compressed_mlp_export_is_never_larger_than_the_original(mlp_task, tmp_path, method, options):
    plan = wb.recipe(method)(mlp_task.model, task=mlp_task, **options)
    model = wb.apply(mlp_task.model, plan, calibration_inputs=mlp_task.calibration_inputs())
    written = export_onnx(model, mlp_task.example_input, tmp_path / "m.onnx", original=mlp_task.model)
    assert written.original_bytes > 300_000  # 84,490 float32 weights
    assert written.bytes <= written.original_bytes
    assert not any("LARGER" in note for note in written.notes)
    x = mlp_task.eval_inputs[:128]
    # int8 runs PyTorch's dynamic int8 kernel (activations rounded too): compare with its weight-only twin
    reference = prepare_for_onnx(model) if method == "int8" else model
    assert onnx_max_error(written.path, reference, x) < TOLERANCE
    graph = onnx.load(str(written.path)).graph
    if method == "prune":  # stored dense, once: three weight matrices, no mask, and said so
        assert any("stored dense" in note and "fc1" in note for note in written.notes)
        assert written.bytes >= written.original_bytes * 0.99
        assert sorted(len(i.dims) for i in graph.initializer) == [1, 1, 1, 2, 2, 2]
    if method in ("quant", "gptq", "svd_quant", "svd_residual"):  # codes in UINT4 initializers behind DequantizeLinear
        codes = [i for i in graph.initializer if i.data_type == onnx.TensorProto.UINT4 and len(i.dims) == 2
                 and i.name.endswith("_codes")]
        assert len(codes) == len([n for n in graph.node if n.op_type == "DequantizeLinear"]) >= 3
        # half a byte per code, plus float32 scales (one per row, or per 32 inputs: 1/8 byte a weight)
        assert written.bytes < written.original_bytes / (3 if method == "svd_residual" else 4 if method == "svd_quant"
                                                         else 5 if "group_size" in options else 6)
    if options.get("bits") == 3:
        assert any("3-bit codes are widened to 4 bits" in note for note in written.notes)


def test_quantized_cnn_exports_codes_per_channel(cnn_task, tmp_path):
    plan = wb.recipe("quant")(cnn_task.model, task=cnn_task, bits=4, per_channel=True)
    model = wb.apply(cnn_task.model, plan)
    written = export_onnx(model, cnn_task.example_input, tmp_path / "q.onnx", original=cnn_task.model)
    assert written.bytes < written.original_bytes / 4
    assert onnx_max_error(written.path, model, cnn_task.eval_inputs[:32]) < TOLERANCE
    graph = onnx.load(str(written.path)).graph
    axes = [a.i for n in graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes and set(axes) == {0}  # per output channel, convolutions included


def test_low_rank_gru_exports_factors_only_as_one_gru_node(gru_task, tmp_path):
    plan = wb.recipe("svd_rnn")(gru_task.model, task=gru_task, ratio=0.5)
    model = wb.apply(gru_task.model, plan)
    written = export_onnx(model, gru_task.example_input, tmp_path / "gru.onnx", original=gru_task.model)
    assert written.bytes <= written.original_bytes
    assert onnx_max_error(written.path, model, gru_task.eval_inputs[:64]) < TOLERANCE
    graph = onnx.load(str(written.path)).graph
    assert [n.op_type for n in graph.node].count("GRU") == 1  # not unrolled over the time steps
    stored = sum(int(torch.tensor(list(i.dims)).prod()) for i in graph.initializer if len(i.dims) >= 2)
    factors = sum(p.numel() for n, p in model.rnn.named_parameters() if n.startswith(("a_", "b_")))
    assert stored == factors + model.head.weight.numel()  # no dense weight_ih / weight_hh beside the factors


def test_guard_says_loudly_when_the_export_is_larger(mlp_task, tmp_path):
    smaller = structurally_pruned(mlp_task.model, 96)
    with pytest.warns(UserWarning, match="LARGER THAN THE ORIGINAL"):
        written = export_onnx(mlp_task.model, mlp_task.example_input, tmp_path / "m.onnx", original=smaller)
    assert written.bytes > written.original_bytes
    assert any(note.startswith("LARGER THAN THE ORIGINAL") for note in written.notes)


def test_int8_qdq_graph_runs_on_integer_kernels_within_a_point(mlp_task, tmp_path):
    written = export_onnx(mlp_task.model, mlp_task.example_input, tmp_path / "qdq.onnx", original=mlp_task.model,
                          quantize="qdq", calibration=mlp_task.calibration_inputs())
    assert written.bytes < written.original_bytes * 0.3  # int8 weights: about 1/4 of float32, plus graph
    assert integer_kernels(written.path)  # onnxruntime fuses the Q/DQ pairs into an integer GEMM (QGemm)
    x, labels = mlp_task.eval_inputs, mlp_task.eval_targets
    onnx_accuracy = float((onnx_outputs(written.path, x).argmax(1) == labels).float().mean())
    float_accuracy = float((predictions(mlp_task.model, x) == labels).float().mean())
    assert onnx_accuracy >= float_accuracy - 0.01


def test_bad_quantize_options_are_refused(mlp_task, tmp_path):
    with pytest.raises(WorkbenchError, match="quantize='fp16' must be None or 'qdq'"):
        export_onnx(mlp_task.model, mlp_task.example_input, tmp_path / "m.onnx", quantize="fp16")
    with pytest.raises(WorkbenchError, match="quantize='qdq' needs calibration inputs"):
        export_onnx(mlp_task.model, mlp_task.example_input, tmp_path / "m.onnx", quantize="qdq")
    assert list(tmp_path.iterdir()) == []


class LastState(nn.Module):
    """``(n, T, in) -> (n, 10)``: an RNN then a head on the last output."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(rnn.hidden_size, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("ranks,per_gate", [((3, 4), True), ((None, 4), False), ((2, None), True)])
def test_recurrent_twin_equals_the_low_rank_loop(kind, ranks, per_gate):
    for batch_first in (True, False):
        low = LowRankRNN.from_rnn(kind(5, 12, batch_first=batch_first), *ranks, per_gate=per_gate)
        twin = onnx_twin(low).module
        for x in (torch.randn(3, 7, 5), torch.randn(7, 5)):  # batched and unbatched
            states = torch.randn(1, x.shape[0 if batch_first else 1], 12) if x.dim() == 3 else torch.randn(1, 12)
            hx = states if kind is nn.GRU else (states, torch.randn_like(states))
            for h in (None, hx):
                with torch.no_grad():
                    expected, got = low(x, h), twin(x, h)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_low_rank_lstm_exports_smaller_than_the_dense_one(tmp_path):
    model = LastState(nn.LSTM(16, 48, batch_first=True)).eval()
    plan = Plan({"rnn": LayerPlan("svd_rnn", {"rank_ih": 4, "rank_hh": 8})})
    low = wb.apply(model, plan)
    written = export_onnx(low, torch.randn(1, 6, 16), tmp_path / "lstm.onnx", original=model)
    assert written.bytes < written.original_bytes
    assert onnx_max_error(written.path, low, torch.randn(5, 6, 16)) < TOLERANCE
    assert [n.op_type for n in onnx.load(str(written.path)).graph.node].count("LSTM") == 1


def test_kmeans_codebooks_say_they_are_stored_float(mlp_task, tmp_path):
    plan = Plan({"fc2": LayerPlan("quant", {"bits": 4, "scheme": "kmeans"})})
    model = wb.apply(mlp_task.model, plan)
    written = export_onnx(model, mlp_task.example_input, tmp_path / "k.onnx", original=mlp_task.model)
    assert any(note.startswith("fc2: k-means codebook weights are stored as float32") for note in written.notes)
    assert written.bytes <= written.original_bytes
    assert onnx_max_error(written.path, model, mlp_task.eval_inputs[:64]) < TOLERANCE


class TiedLM(nn.Module):
    """ids ``(n, T)`` -> logits ``(n, T, 300)``, the head tied to the embedding table."""

    def __init__(self):
        super().__init__()
        self.emb, self.mix = nn.Embedding(300, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 300, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_quantized_tied_embedding_exports_its_codes_once(tmp_path):
    model = TiedLM().eval()
    quantized = wb.apply(model, wb.recipe("quant_embedding")(model, bits=4, layers=["emb", "head"]))
    ids = torch.randint(0, 300, (4, 7))
    written = export_onnx(quantized, ids[:1], tmp_path / "lm.onnx", original=model)
    assert onnx_max_error(written.path, quantized, ids) < TOLERANCE
    graph = onnx.load(str(written.path)).graph
    tables = [i for i in graph.initializer if tuple(i.dims) == (300, 32)]
    assert [t.data_type for t in tables] == [onnx.TensorProto.UINT4]  # one table, 4-bit codes, no float copy
    assert written.bytes < written.original_bytes / 3
