"""N:M semi-structured sparsity: the pattern, the stored bytes, the computation, round trips, bad
input; the measured speed-up beside the FLOP ratio of pruning results; latency as a Pareto axis."""
import itertools
import math

from matplotlib.collections import LineCollection
import pytest
import torch
from torch import nn

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.export import load_compressed, save_compressed
from workbench.kernels import nm as nm_kernels
from workbench.layers.nm import NMSparseLinear
from workbench.measure import SPEED_THREADS, compare_latency, count_flops, count_params, fixed_threads
from workbench.methods.nm_sparsity import latency_verdict, nm_latency
from workbench.registry import get_recipe
from workbench.select.pareto import Point, pareto_front
from workbench.ties import payload_bytes

PATTERNS = [(2, 4), (4, 8), (1, 2), (3, 8)]


def state_bytes(model):
    return payload_bytes(model.state_dict())


@pytest.mark.parametrize("n,m", PATTERNS)
def test_mask_keeps_exactly_the_n_largest_of_every_m_inputs(n, m):
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    mask = nm_kernels.nm_mask(w, n, m)
    groups, kept = w.abs().reshape(-1, m), mask.reshape(-1, m)
    assert (kept.sum(dim=1) == n).all()
    for g, k in zip(groups, kept):  # every kept magnitude >= every dropped one, group by group
        assert g[k].min() >= g[~k].max()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (3, 7)])
def test_index_codes_are_a_bijection_onto_0_to_C_m_n(n, m):
    combos = torch.tensor(list(itertools.combinations(range(m), n)))
    codes = nm_kernels.rank_positions(combos, n, m)
    assert sorted(codes.tolist()) == list(range(math.comb(m, n)))
    assert torch.equal(nm_kernels.unrank_positions(codes, n, m), combos)
    assert math.comb(m, n) <= 2 ** nm_kernels.code_bits(n, m) < 2 * math.comb(m, n)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_computes_the_dense_masked_matmul_from_its_stored_values(n, m, bias):
    torch.manual_seed(1)
    linear = nn.Linear(64, 40, bias=bias)
    before = linear.weight.detach().clone()
    layer = NMSparseLinear.from_linear(linear, n, m)
    mask = nm_kernels.nm_mask(linear.weight, n, m)
    x = torch.randn(7, 3, 64)
    with torch.no_grad():
        expected = nn.functional.linear(x, linear.weight * mask, linear.bias)
        assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.equal(layer.mask(), mask) and torch.equal(linear.weight, before)
    # only the kept values, the packed codes and the bias are stored
    assert set(layer.state_dict()) == {"values", "codes"} | ({"bias"} if bias else set())
    assert layer.values.shape == (40, 64 * n // m)
    groups = 40 * 64 // m
    formula = groups * n * 4 + math.ceil(groups * nm_kernels.code_bits(n, m) / 8) + (4 * 40 if bias else 0)
    assert state_bytes(layer) == layer.payload_bytes() == nm_kernels.nm_bytes(40, 64, n, m, bias=bias) == formula


def test_2_4_stores_3_bits_per_group():
    assert nm_kernels.code_bits(2, 4) == 3 and nm_kernels.code_bits(4, 8) == 7
    # 256 x 256 at 2:4: half the float32 weights plus 3 bits per 4 inputs
    assert nm_kernels.nm_bytes(256, 256, 2, 4, bias=False) == 256 * 128 * 4 + 256 * 64 * 3 // 8


def test_state_dict_round_trip_restores_the_decoded_index():
    torch.manual_seed(2)
    layer = NMSparseLinear.from_linear(nn.Linear(32, 16), 2, 4)
    fresh = NMSparseLinear(32, 16, 2, 4)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    assert "columns" not in layer.state_dict()  # the decoded index is a cache, never saved


@pytest.mark.parametrize("bias", [True, False])
def test_training_view_is_the_masked_dense_linear_and_repacks_to_the_same_pattern(bias):
    torch.manual_seed(3)
    linear = nn.Linear(16, 6, bias=bias)
    layer = NMSparseLinear.from_linear(linear, 2, 4)
    dense, mask = layer.to_masked()
    expected = nm_kernels.nm_mask(linear.weight, 2, 4)
    assert type(dense) is nn.Linear and torch.equal(mask, expected)
    assert torch.equal(dense.weight, linear.weight.detach() * expected)  # kept weights as they were, zeros elsewhere
    assert (dense.bias is None) == (not bias) and (not bias or torch.equal(dense.bias, linear.bias))
    with torch.no_grad():
        dense.weight.add_(mask * 0.5)  # "training" moves only kept weights
    again = NMSparseLinear.from_masked(dense, 2, 4, mask=mask)
    assert torch.equal(again.mask(), mask) and torch.equal(again.dense_weight(), dense.weight)


def test_recipe_applies_to_every_linear_without_touching_the_original(mlp_task, tmp_path):
    before = {k: v.clone() for k, v in mlp_task.model.state_dict().items()}
    plan = get_recipe("nm")(mlp_task.model, n=2, m=4)
    assert sorted(plan.layers) == ["fc1", "fc2", "fc3"]
    model = wb.apply(mlp_task.model, plan)
    assert all(torch.equal(v, before[k]) for k, v in mlp_task.model.state_dict().items())
    assert all(isinstance(model.get_submodule(n), NMSparseLinear) for n in plan.layers)
    dense_weights = sum(mlp_task.model.get_submodule(n).weight.numel() for n in plan.layers)
    assert count_params(model) == count_params(mlp_task.model) - dense_weights // 2
    assert state_bytes(model) == state_bytes(mlp_task.model) - sum(
        4 * w.numel() - nm_kernels.nm_bytes(*w.shape, 2, 4, bias=False)
        for w in (mlp_task.model.get_submodule(n).weight for n in plan.layers))
    assert mlp_task.evaluate(model) > 0.9  # 2:4 by magnitude keeps the digits MLP usable
    path = save_compressed(tmp_path / "nm.safetensors", model, plan, "digits-mlp")
    loaded, loaded_plan, _ = load_compressed(path)
    x = mlp_task.eval_inputs[:32]
    with torch.no_grad():
        assert loaded_plan == plan and torch.equal(loaded(x), model(x))


def test_bad_settings_are_refused_with_the_value_and_the_rule(mlp_task):
    odd = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(WorkbenchError, match=r"m=4 does not divide the input width 6 of layer '4'"):
        get_recipe("nm")(odd, n=2, m=4)
    with pytest.raises(WorkbenchError, match=r"n=4 must satisfy 1 <= n < m=4"):
        get_recipe("nm")(mlp_task.model, n=4, m=4)
    with pytest.raises(WorkbenchError, match=r"m=16 must be in 2..8"):
        get_recipe("nm")(mlp_task.model, n=2, m=16)
    with pytest.raises(WorkbenchError, match=r"n=2.5 must be an integer"):
        get_recipe("nm")(mlp_task.model, n=2.5, m=4)
    with pytest.raises(WorkbenchError, match=r"does not take option 'ratio'"):
        get_recipe("nm")(mlp_task.model, ratio=0.5)
    with pytest.raises(WorkbenchError, match=r"'act1' of type ReLU cannot take N:M"):
        get_recipe("nm")(mlp_task.model, layers=["act1"])
    with pytest.raises(WorkbenchError, match=r"exactly 2 per group"):
        NMSparseLinear.from_linear(nn.Linear(8, 2), 2, 4, mask=torch.ones(2, 8, dtype=torch.bool))
    bad = wb.Plan({"4": wb.LayerPlan("nm", {"n": 2, "m": 4})})
    with pytest.raises(WorkbenchError, match=r"width 6 of layer '4'"):
        wb.apply(odd, bad)


def test_latency_verdict_says_slower_or_faster_from_the_measured_figures():
    row = {"n": 2, "m": 4, "batch": 64, "threads": 2, "nm_ms": 3.0, "dense_ms": 1.5, "compact_ms": 0.8}
    assert "2:4 is 2.00x SLOWER than dense" in latency_verdict(row)
    assert "CUDA-only" in latency_verdict(row)
    assert "1.50x faster" in latency_verdict({**row, "nm_ms": 1.0})


def test_nm_latency_measures_both_layers_in_one_run():
    layer = NMSparseLinear.from_linear(nn.Linear(32, 16), 2, 4)
    row = nm_latency(layer, batch=4, repeats=2, warmup=1)
    assert row["threads"] == SPEED_THREADS and row["shape"] == [16, 32]
    assert min(row["nm_ms"], row["dense_ms"], row["compact_ms"]) > 0
    assert row["speedup"] == pytest.approx(row["dense_ms"] / row["nm_ms"], rel=1e-2)
    assert row["verdict"] == latency_verdict(row)


def test_fixed_threads_restores_the_count_and_refuses_bad_values():
    before = torch.get_num_threads()
    with fixed_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
    with pytest.raises(WorkbenchError, match="threads=0 must be an integer >= 1"):
        with fixed_threads(0):
            pass
    model = nn.Linear(4, 4).train()
    ms = compare_latency({"a": model, "b": nn.Linear(4, 4)}, torch.randn(2, 4), threads=1, repeats=2, warmup=0)
    assert set(ms) == {"a", "b"} and model.training and torch.get_num_threads() == before


def test_pruning_results_report_the_measured_speedup_beside_the_flop_ratio(mlp_task):
    from workbench.methods.pruning import pruning_report
    plan = get_recipe("prune")(mlp_task.model, task=mlp_task, ratio=0.5, structured=True)
    pruned = wb.apply(mlp_task.model, plan)
    report = pruning_report(mlp_task.model, pruned, mlp_task, plan)
    speed = report["speed"]
    example = mlp_task.eval_inputs[:64]
    assert speed["threads"] == SPEED_THREADS and speed["batch"] == 64
    assert speed["flop_ratio"] == round(count_flops(pruned, example) / count_flops(mlp_task.model, example), 4)
    assert speed["flop_ratio"] < 0.6  # half of each hidden layer's neurons gone
    assert speed["speedup"] == pytest.approx(speed["original_ms"] / speed["compressed_ms"], rel=1e-2)
    assert any(note.startswith("measured speed-up") for note in report["notes"])


def test_cli_compress_nm_reports_bytes_speed_and_the_verdict(capsys, mlp_task):
    from test_cli import run_json
    from workbench.cli import main
    out = run_json(capsys, "compress", "digits-mlp", "--method", "nm", "--n", "2", "--m", "4", "--json")
    assert out["plan"]["layers"]["fc2"] == {"method": "nm", "n": 2, "m": 4}
    assert out["after"]["bytes"] < 0.6 * out["before"]["bytes"]
    assert {"speedup", "flop_ratio", "threads", "original_ms", "compressed_ms"} <= set(out["speed"])
    assert out["speed"]["flop_ratio"] == 1.0  # the CPU runs the expanded dense matmul: no FLOP saved
    assert len(out["nm_latency"]["layers"]) == 3 and "CUDA-only" in out["nm_latency"]["verdict"]
    assert main(["compress", "digits-mlp", "--method", "prune", "--ratio", "0.5", "--n", "2"]) == 2
    assert "--n does not apply to --method prune" in capsys.readouterr().err


def test_onnx_export_stores_nm_layers_dense_and_says_so(mlp_task, tmp_path):
    pytest.importorskip("onnx")
    from workbench.export.onnx_format import export_onnx, onnx_max_error
    model = wb.apply(mlp_task.model, get_recipe("nm")(mlp_task.model))
    written = export_onnx(model, mlp_task.example_input, tmp_path / "nm.onnx")
    assert onnx_max_error(written.path, model, mlp_task.eval_inputs[:20]) < 1e-4
    assert sum("2:4 sparsity is stored dense in ONNX" in note for note in written.notes) == 3


def points():
    return [Point("original", "original", 0.97, 100, 4000, latency_ms=1.0),
            Point("nm", "nm 2:4", 0.95, 50, 2100, latency_ms=1.8),
            Point("prune", "structured", 0.93, 50, 2000, latency_ms=0.5)]


def test_latency_is_a_pareto_axis_and_unknown_axes_are_refused():
    front = pareto_front(points(), "latency")
    assert [p.label for p in front] == ["structured", "original"]  # the slower 2:4 is dominated on latency
    assert front == pareto_front(points(), "latency_ms")
    assert [p.label for p in pareto_front(points(), "bytes")] == ["structured", "nm 2:4", "original"]
    with pytest.raises(WorkbenchError, match=r"x='speed' must be one of bytes, params, latency"):
        pareto_front(points(), "speed")


def test_pareto_figure_draws_latency_on_x():
    from workbench.report.figures import pareto_figure
    rows = [p.to_dict() for p in points()]
    fig = pareto_figure(rows, ["structured", "original"], None, "accuracy", x="latency")
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("measured latency (ms")
    xs = sorted(float(x) for line in ax.get_lines() if line.get_label() != "Pareto front" for x in line.get_xdata())
    assert xs == [0.5, 1.0, 1.8]
    assert not [c for c in ax.collections if isinstance(c, LineCollection)]  # no quartiles: no bars
    spread = [{**r, "latency_q1_ms": r["latency_ms"] * 0.8, "latency_q3_ms": r["latency_ms"] * 1.5} for r in rows]
    spread[0] = {**spread[0], "latency_q1_ms": None, "latency_q3_ms": None}  # a point without a spread
    bars = pareto_figure(spread, ["structured", "original"], None, "accuracy", x="latency").axes[0]
    segments = sorted((round(seg[0][0], 6), round(seg[1][0], 6)) for c in bars.collections
                      if isinstance(c, LineCollection) for seg in c.get_segments())
    assert segments == [(0.4, 0.75), (1.44, 2.7)]  # quartiles around the medians 0.5 and 1.8; 1.0 none
    flat = pareto_figure(spread, ["structured", "original"], None, "accuracy", x="bytes").axes[0]
    assert not [c for c in flat.collections if isinstance(c, LineCollection) and len(c.get_segments())]
    with pytest.raises(WorkbenchError, match=r"x='flops' must be one of bytes, latency"):
        pareto_figure(rows, [], None, "accuracy", x="flops")
    with pytest.raises(WorkbenchError, match="no point has a measured latency_ms"):
        pareto_figure([{**r, "latency_ms": None} for r in rows], [], None, "accuracy", x="latency")
