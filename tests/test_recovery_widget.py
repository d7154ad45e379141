"""The recovery explorer, headless: curves grow with the history, results land on the size chart,
Cancel leaves the compressed model as it was, errors become a message."""
import threading

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

import workbench as wb  # noqa: E402
from conftest import state_bytes  # noqa: E402
from workbench.plotting.recovery import add_result, draw_curves, draw_size_chart, update_curves  # noqa: E402
from workbench.widgets.recovery import RecoveryExplorer, default_compressions  # noqa: E402


@pytest.fixture
def plans():
    return {"fc2 rank 4": wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": 4})})}


def test_finetune_click_grows_curves_and_adds_a_point(mlp_task, plans):
    explorer = RecoveryExplorer(mlp_task, plans, epochs=4, background=False)
    compressed = explorer.compressed_model("fc2 rank 4")
    before = state_bytes(compressed)
    explorer.finetune_button.click()
    epochs = [h["epoch"] for h in explorer.history]
    assert 1 <= len(epochs) <= 4 and explorer.progress.value == len(epochs)
    assert list(explorer.curves.loss.get_xdata()) == epochs
    assert list(explorer.curves.metric.get_ydata()) == [h["metric"] for h in explorer.history]
    (result,) = explorer.results
    assert result["after"] > result["before"]
    assert list(explorer.chart.recovered.get_ydata()) == [result["after"]]
    assert list(explorer.chart.compressed.get_xdata()) == [result["bytes"]]
    assert "fc2 rank 4" in explorer.status.value and not explorer.finetune_button.disabled
    assert state_bytes(compressed) == before
    explorer.distill_button.click()
    assert len(explorer.results) == 2 and explorer.results[1]["kind"] == "distill"


def test_default_2_bit_preset_is_heavy_damage_and_the_mse_range_is_not(mlp_task):
    plans = default_compressions(mlp_task)
    heavy = plans["quantization, 2 bits, range = largest weight"]
    assert {entry.params["clip"] for entry in heavy.layers.values()} == {"max"}
    original = mlp_task.evaluate()
    damaged = mlp_task.evaluate(wb.apply(mlp_task.model, heavy))
    default_range = mlp_task.evaluate(wb.apply(mlp_task.model, wb.get_recipe("quant")(mlp_task.model, bits=2)))
    mild = mlp_task.evaluate(wb.apply(mlp_task.model, plans["quantization, 4 bits"]))
    assert damaged < original - 0.2 and damaged < default_range - 0.2 and mild > original - 0.02


def test_cancel_keeps_the_compressed_model_and_adds_nothing(mlp_task, plans):
    explorer = RecoveryExplorer(mlp_task, plans, epochs=500, background=True)
    before = state_bytes(explorer.compressed_model("fc2 rank 4"))
    explorer.finetune_button.click()
    assert explorer.finetune_button.disabled and not explorer.cancel_button.disabled
    explorer.cancel_button.click()
    explorer.wait(timeout=60)
    assert not explorer.running and explorer.results == []
    assert "Cancelled" in explorer.status.value and "unchanged" in explorer.status.value
    assert state_bytes(explorer.compressed_model("fc2 rank 4")) == before
    assert not explorer.finetune_button.disabled and explorer.cancel_button.disabled


def test_errors_become_a_message(mlp_task):
    explorer = RecoveryExplorer(mlp_task, {"wrong outputs": nn.Linear(64, 7)}, epochs=2, background=False)
    explorer.distill_button.click()
    assert "do not match" in explorer.error.value and "Traceback" not in explorer.error.value
    assert "stopped with an error" in explorer.status.value and explorer.results == []
    assert not explorer.distill_button.disabled


def test_plotting_updates_artists_in_place():
    fig = Figure()
    ax1, ax2, ax3 = fig.subplots(1, 3)
    curves = draw_curves(ax1, ax2)
    line = curves.loss
    update_curves(curves, [1, 2], [0.9, 0.5], [1.0, 0.7], [0.8, 0.9])
    assert curves.loss is line and list(line.get_ydata()) == [0.9, 0.5]
    chart = draw_size_chart(ax3, 1000, 0.97)
    add_result(chart, 100, 0.5, 0.95, "ft")
    add_result(chart, 200, 0.6, 0.96, "kd")
    assert list(chart.compressed.get_ydata()) == [0.5, 0.6]
    assert list(chart.recovered.get_xdata()) == [100, 200] and len(chart.arrows) == 2


def test_curves_are_drawn_from_the_worker_thread(mlp_task, plans):
    explorer = RecoveryExplorer(mlp_task, plans, epochs=2)  # background: trains on the coalescer's worker
    threads, draw, image = [], explorer.view.draw, explorer.view.widget.value
    explorer.view.draw = lambda moving=(): (threads.append(threading.current_thread().name), draw(moving))
    explorer.finetune_button.click()
    explorer.wait(120)
    assert explorer.error.value == "" and len(explorer.results) == 1
    assert "workbench-coalescer" in threads  # the curves and the result point: drawn by the worker
    assert list(explorer.curves.loss.get_xdata()) == [h["epoch"] for h in explorer.history] != []
    assert explorer.view.widget.value != image and explorer.view.widget.value[:4] == b"\x89PNG"
