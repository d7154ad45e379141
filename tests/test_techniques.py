"""Lesson 09's compute (`workbench.export.checks`) against oracles, and its live figures headless:
moving each control changes the figure's PNG (the `ipywidgets.Image` the page shows)."""

import pytest
import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.export import checks
from workbench.measure import latency_ms, latency_samples
from workbench.plan import Plan
from workbench.registry import get_recipe

from conftest import state_bytes


def test_latency_samples_and_timing_spread(mlp_task):
    samples = latency_samples(mlp_task.model, mlp_task.example_input, repeats=9, warmup=1)
    assert len(samples) == 9 and all(s > 0 for s in samples)
    t = checks.timing(mlp_task.model, mlp_task.example_input, repeats=9, warmup=1)
    assert t["min_ms"] <= t["q1_ms"] <= t["median_ms"] <= t["q3_ms"] and t["repeats"] == 9
    assert latency_ms(mlp_task.model, mlp_task.example_input, repeats=3, warmup=0) > 0
    both = checks.interleaved_timings({"a": mlp_task.model, "b": mlp_task.model}, mlp_task.example_input,
                                      repeats=10, warmup=1, rounds=5)
    assert [t["repeats"] for t in both.values()] == [10, 10]
    with pytest.raises(WorkbenchError, match="rounds=5"):
        checks.interleaved_timings({"a": mlp_task.model}, mlp_task.example_input, repeats=3, rounds=5)
    with pytest.raises(WorkbenchError, match="repeats=0"):
        latency_samples(mlp_task.model, mlp_task.example_input, repeats=0)


def _bn_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6))
    net.train()
    for _ in range(3):  # non-trivial running statistics
        net(torch.randn(16, 1, 8, 8) * 3 + 1)
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2)
        net[5].bias.uniform_(-1, 1)
    return net.eval()


def test_fold_bn_check_is_exact_and_leaves_the_model_alone():
    net = _bn_net()
    before = state_bytes(net)
    x = torch.randn(32, 1, 8, 8)
    report = checks.fold_bn_check(net, x)
    assert report["pairs"] == [("0", "1"), ("4", "5")] and report["left"] == {}
    assert (report["bn_before"], report["bn_after"]) == (2, 0)
    # the layers had biases already: folding only removes each BN's gamma and beta (2 per channel)
    assert report["params_before"] - report["params_after"] == 2 * 4 + 2 * 6
    with torch.no_grad():
        assert torch.allclose(report["model"](x), net(x), atol=1e-5)
    assert report["max_abs_diff"] < 1e-5
    assert state_bytes(net) == before


def test_fold_bn_check_refuses_a_model_without_bn(mlp_task):
    with pytest.raises(WorkbenchError, match="nothing to fold"):
        checks.fold_bn_check(mlp_task.model, mlp_task.eval_inputs[:4])


def test_export_round_trip_matches_and_is_smaller(mlp_task, tmp_path):
    pytest.importorskip("onnxruntime")
    plan = get_recipe("quant")(mlp_task.model, bits=4)
    report = checks.export_round_trip(mlp_task.model, plan, mlp_task.eval_inputs[:50], tmp_path, "digits-mlp",
                                      label="q4")
    assert (tmp_path / "q4.safetensors").stat().st_size == report["safetensors_bytes"]
    assert (tmp_path / "q4.onnx").stat().st_size == report["onnx_bytes"]
    assert report["load_max_diff"] == 0.0
    assert report["onnx_max_diff"] < 1e-4
    # 4-bit codes: well under a third of the float32 files
    assert report["safetensors_bytes"] < report["dense_safetensors_bytes"] / 3
    assert report["onnx_bytes"] < report["dense_onnx_bytes"] / 3
    with pytest.raises(WorkbenchError, match="label="):
        checks.export_round_trip(mlp_task.model, plan, mlp_task.eval_inputs[:5], tmp_path, "digits-mlp", label="")


# ---------------------------------------------------------------------------------------- widgets
def _moves_figure(view, value):
    before = view.view.widget.value
    state = view.update(value)
    assert view.error.value == ""
    assert view.view.widget.value != before and view.view.widget.value[:4] == b"\x89PNG"
    return state


def test_l1_view_moves_figure_and_l1_sparsifies(mlp_task):
    from workbench.widgets.techniques import L1View

    before = state_bytes(mlp_task.model)
    view = L1View(mlp_task, strengths=(0.0, 1e-3), epochs=2, synchronous=True)
    plain = view.state
    strong = _moves_figure(view, 1e-3)
    assert strong["pruned"] > plain["pruned"] + 0.1  # the L1 term drives weights below the cut
    assert strong["pruned"] == pytest.approx(float((strong["magnitudes"] <= view.threshold).mean()))
    assert "L1 = 0.001" in view.readout.value
    assert state_bytes(mlp_task.model) == before


def test_fold_view_moves_figure():
    from workbench.widgets.techniques import FoldView

    net = _bn_net()
    folded = checks.fold_bn_check(net, torch.randn(4, 1, 8, 8))["model"]
    view = FoldView({"original": net, "folded": folded}, torch.randn(8, 1, 8, 8), batches=(1, 16), repeats=5,
                    synchronous=True)
    state = _moves_figure(view, 16)
    assert set(state["timings"]) == {"original", "folded"} and state["batch"] == 16
    assert "batch 16" in view.readout.value


def test_export_view_moves_figure(mlp_task, tmp_path):
    pytest.importorskip("onnxruntime")
    from workbench.widgets.techniques import ExportView

    plans = {"int8": get_recipe("quant")(mlp_task.model, bits=8), "dense": Plan({})}
    view = ExportView(mlp_task, plans, folder=tmp_path, synchronous=True)
    assert view.state["safetensors_bytes"] < view.state["dense_safetensors_bytes"] / 2
    state = _moves_figure(view, "dense")
    assert state["onnx_bytes"] == state["dense_onnx_bytes"]
    with pytest.raises(WorkbenchError, match="plans is empty"):
        ExportView(mlp_task, {}, synchronous=True)


def test_sweep_view_moves_figure_and_names_the_weakest_layer(mlp_task):
    from workbench.select import sensitivity
    from workbench.widgets.techniques import SweepView

    results = {m: sensitivity(mlp_task, m, grid, layers=["fc1", "fc3"], progress=False)
               for m, grid in (("svd", (0.05, 0.5)), ("quant", (2, 8)))}
    view = SweepView(results, synchronous=True)
    state = _moves_figure(view, "quant")
    r = results["quant"]
    j = r.grid.index(2)
    assert state["most_sensitive"] == min(r.layers, key=lambda n: r.metric[r.layers.index(n)][j])
    assert state["most_sensitive"] in view.readout.value


def test_background_thread_updates_the_image(mlp_task):
    """The notebook path: the worker thread replaces the Image's value."""
    from workbench.widgets.techniques import SweepView
    from workbench.select import sensitivity

    results = {m: sensitivity(mlp_task, m, grid, layers=["fc1"], progress=False)
               for m, grid in (("svd", (0.1, 0.5)), ("prune", (0.1, 0.5)))}
    view = SweepView(results)
    before = view.view.widget.value
    view.control.value = "prune"
    assert view.coalescer.wait(30)
    assert view.view.widget.value != before and view.state["method"] == "prune"


def test_displayed_view_carries_its_figure_as_png(mlp_task):
    """A lesson-09 view displayed: widget view for live front ends, its current figure as image/png."""
    import base64

    from IPython.core.formatters import DisplayFormatter
    from workbench.select import sensitivity
    from workbench.widgets.techniques import SweepView

    results = {m: sensitivity(mlp_task, m, grid, layers=["fc1"], progress=False)
               for m, grid in (("svd", (0.1, 0.5)), ("prune", (0.1, 0.5)))}
    view = SweepView(results, synchronous=True)
    data, _ = DisplayFormatter().format(view)
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == view.model_id
    assert base64.b64decode(data["image/png"]) == view.view.widget.value
    view.update("prune")
    data, _ = DisplayFormatter().format(view)
    assert base64.b64decode(data["image/png"]) == view.view.widget.value
