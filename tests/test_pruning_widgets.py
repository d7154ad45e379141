"""The pruning and quantization explorers, headless: call update, check state and artist data."""
import threading

import numpy as np
import pytest
import torch

from matplotlib.figure import Figure

from workbench.kernels import quant as quant_kernels
from workbench.plotting.histograms import draw_grid, draw_weight_histogram, update_grid, update_weight_histogram
from workbench.widgets.pruning import PruningExplorer
from workbench.widgets.quantization import QuantizationExplorer


def test_pruning_explorer_moves_the_cut_and_updates_measures(mlp_task):
    explorer = PruningExplorer(mlp_task, synchronous=True)
    assert explorer.state["metric"] == pytest.approx(mlp_task.evaluate())
    state = explorer.update(0.05)
    assert explorer.cut.high.get_xdata()[0] == pytest.approx(0.05)
    heat = explorer.heatmap.image.get_array()[0]
    assert np.allclose(heat, [state["sparsity"][n] for n in explorer.names]) and heat.min() > 0.2
    assert state["bytes"] < explorer.base["bytes"]
    assert explorer.heatmap.labels[0].get_text() == f"{heat[0]:.0%}"
    explorer.threshold.value = 0.03  # the slider drives the same path
    assert explorer.state["threshold"] == pytest.approx(0.03) and explorer.state["bytes"] > state["bytes"]
    explorer.threshold.value = 0.0  # back to the original: undo is re-applying the plan
    assert explorer.state["bytes"] == explorer.base["bytes"]
    assert explorer.state["metric"] == pytest.approx(mlp_task.evaluate())


def test_pruning_explorer_agrees_with_apply(mlp_task):
    import workbench as wb
    from workbench.widgets.pruning import threshold_plan

    explorer = PruningExplorer(mlp_task, synchronous=True)
    state = explorer.update(0.04)
    model = wb.apply(mlp_task.model, threshold_plan(explorer.names, 0.04))
    assert state["metric"] == pytest.approx(mlp_task.evaluate(model))


def test_pruning_explorer_shows_errors_as_messages(mlp_task):
    explorer = PruningExplorer(mlp_task, synchronous=True)
    before, summary = explorer.state, explorer.summary.value
    state = explorer.update(100.0)  # a cut that empties every layer: a message, nothing half-changed
    assert "prunes every weight" in explorer.error.value and "Traceback" not in explorer.error.value
    assert state is before and explorer.summary.value == summary
    assert explorer.cut.high.get_xdata()[0] == pytest.approx(0.0)
    explorer.layer.value = "fc2"
    assert explorer.histogram.ax.get_title().startswith("fc2: 0% of its 65,536 weights") and explorer.error.value == ""


def test_quantization_explorer_draws_both_grids(mlp_task):
    explorer = QuantizationExplorer(mlp_task, bits=2, synchronous=True)
    segments = {s: explorer.grids[s].get_segments() for s in ("uniform", "kmeans")}
    # the levels some weight takes, from the kernel itself: symmetric 2-bit uniform uses 3 of its 4 codes
    # (the restricted signed range), on the range the default clip chooses
    w = mlp_task.model.fc1.weight.detach()
    w_hat = quant_kernels.dequantize_uniform(*quant_kernels.quantize_uniform(w, 2, clip=quant_kernels.default_clip(2)))
    values, counts = torch.unique(w_hat, return_counts=True)
    assert len(values) == 3
    assert np.allclose(sorted(seg[0][0] for seg in segments["uniform"]), values.numpy())
    assert len(explorer.state["uniform"]["levels"]["fc1"]) == 4
    kmeans_levels = sorted(seg[0][0] for seg in segments["kmeans"])
    assert np.allclose(kmeans_levels, explorer.state["kmeans"]["levels"]["fc1"])
    assert explorer.state["uniform"]["busiest"]["fc1"] == pytest.approx(float(counts.max()) / w.numel())
    assert "3 of 4 levels used" in explorer.histograms["uniform"].ax.get_title()
    before = explorer.state["uniform"]["bytes"]
    explorer.bits.value = 3  # the slider path (coalesced; synchronous here)
    assert len(explorer.grids["uniform"].get_segments()) == len(explorer.state["uniform"]["used"]["fc1"]) == 7
    assert explorer.state["uniform"]["bytes"] > before
    assert explorer.state["kmeans"]["metric"] >= explorer.state["uniform"]["metric"] - 0.05


def test_update_grid_widens_the_axes_so_that_a_level_at_the_edge_shows():
    ax = Figure().subplots()
    histogram = draw_weight_histogram(ax, np.array([-1.0, 0.0, 1.0]))
    update_weight_histogram(histogram, np.array([-1.0, 0.0, 1.0]))  # x limits: exactly the bins, [-1, 1]
    lines = draw_grid(ax, [])
    update_grid(lines, [-1.0, 0.0, 1.0])
    assert ax.get_xlim() == (-1.0, 1.0)  # without widen: levels on the edges, drawn on the frame
    update_grid(lines, [-1.0, 0.0, 1.0], widen=True)
    low, high = ax.get_xlim()
    assert low == pytest.approx(-1.1) and high == pytest.approx(1.1)


# --------------------------------------------------------------------------- figures from the worker thread
def record_draws(explorer) -> list[str]:
    """Names of the threads that draw the explorer's figure from now on."""
    threads, draw = [], explorer.view.draw

    def recording(moving=()):
        threads.append(threading.current_thread().name)
        draw(moving)

    explorer.view.draw = recording
    return threads


def test_pruning_figure_follows_the_slider_from_the_worker_thread(mlp_task):
    explorer = PruningExplorer(mlp_task, threshold=0.02)  # not synchronous: the coalescer's worker draws
    threads, image = record_draws(explorer), explorer.view.widget.value
    heat = np.array(explorer.heatmap.image.get_array()[0])
    explorer.threshold.value = 0.06
    explorer.wait(60)
    assert threads == ["workbench-coalescer"] and explorer.error.value == ""
    assert explorer.cut.high.get_xdata()[0] == pytest.approx(0.06)
    assert (np.array(explorer.heatmap.image.get_array()[0]) > heat).all()  # a higher cut removes more
    assert explorer.view.widget.value != image and explorer.view.widget.value[:4] == b"\x89PNG"


def test_quantization_figure_follows_the_slider_from_the_worker_thread(mlp_task):
    explorer = QuantizationExplorer(mlp_task, bits=3)
    threads, image = record_draws(explorer), explorer.view.widget.value
    assert explorer.histograms["uniform"].ax.get_title().startswith("uniform, 3 bits: fc1")
    explorer.bits.value = 1
    explorer.wait(60)
    assert threads == ["workbench-coalescer"] and explorer.error.value == ""
    for scheme in ("uniform", "kmeans"):
        assert explorer.histograms[scheme].ax.get_title().startswith(f"{scheme}, 1 bits: fc1")
        assert len(explorer.grids[scheme].get_segments()) == 2  # 2^1 levels drawn
    assert explorer.view.widget.value != image and explorer.view.widget.value[:4] == b"\x89PNG"
