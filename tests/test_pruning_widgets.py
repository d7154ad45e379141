"""The pruning and quantization explorers, headless: call update, check state and artist data."""
import threading

import numpy as np
import pytest

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
    # the levels some weight takes: symmetric 2-bit uniform is {-max|w|, 0, +max|w|} (its 4th code unused)
    top = float(mlp_task.model.fc1.weight.detach().abs().max())
    assert np.allclose(sorted(seg[0][0] for seg in segments["uniform"]), [-top, 0.0, top])
    assert len(explorer.state["uniform"]["levels"]["fc1"]) == 4
    kmeans_levels = sorted(seg[0][0] for seg in segments["kmeans"])
    assert np.allclose(kmeans_levels, explorer.state["kmeans"]["levels"]["fc1"])
    w = mlp_task.model.fc1.weight.detach()
    assert explorer.state["uniform"]["busiest"]["fc1"] == pytest.approx(float((w.abs() < top / 2).float().mean()))
    assert "3 of 4 levels used" in explorer.histograms["uniform"].ax.get_title()
    low, high = explorer.histograms["uniform"].ax.get_xlim()
    assert low < -top and high > top  # the outer levels are inside the axes, not on their edge
    before = explorer.state["uniform"]["bytes"]
    explorer.bits.value = 3  # the slider path (coalesced; synchronous here)
    assert len(explorer.grids["uniform"].get_segments()) == len(explorer.state["uniform"]["used"]["fc1"]) == 7
    assert explorer.state["uniform"]["bytes"] > before
    assert explorer.state["kmeans"]["metric"] >= explorer.state["uniform"]["metric"] - 0.05


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
