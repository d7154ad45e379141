"""Throttled widgets and the dashboard, headless: coalescing, errors as messages, live readouts,
artists updated in place; plotting functions leave global style alone."""
import threading

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

import workbench as wb
from conftest import state_bytes
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.plotting.spectra import spectra_figure, update_rank_markers
from workbench.plotting.tradeoff import draw_tradeoff, update_tradeoff
from workbench.registry import methods
from workbench.widgets.dashboard import Dashboard, knobs_for
from workbench.widgets.throttle import Coalescer


def test_coalescer_keeps_only_the_latest_value_and_ends_on_it():
    release, started = threading.Event(), threading.Event()
    rendered = []

    def compute(value):
        started.set()
        release.wait(5)
        return value * 10

    coalescer = Coalescer(compute, rendered.append, on_error=pytest.fail)
    coalescer.submit(1)
    assert started.wait(5)
    for value in (2, 3, 4):          # arrive while 1 is computing
        coalescer.submit(value)
    assert coalescer.busy
    release.set()
    assert coalescer.wait(5)
    assert coalescer.computed == [1, 4]
    assert rendered == [10, 40]


def test_coalescer_turns_errors_into_messages():
    messages, rendered = [], []

    def compute(value):
        if value < 0:
            raise WorkbenchError(f"rank={value} must be at least 1")
        if value == 0:
            raise ZeroDivisionError("boom")
        return value

    coalescer = Coalescer(compute, rendered.append, messages.append)
    for value in (-3, 0, 5):
        coalescer.submit(value)
        coalescer.wait()
    assert messages == ["rank=-3 must be at least 1", "internal error (ZeroDivisionError): boom"]
    assert rendered == [5]


@pytest.fixture(scope="module")
def mlp_dashboard(mlp_task):
    return Dashboard(mlp_task)


def test_dashboard_has_one_slider_per_layer_and_follows_the_registry(mlp_task, gru_task):
    assert [k.layer for k in knobs_for(mlp_task.model)] == [i.name for i in matrix_layers(mlp_task.model)]
    gru_knobs = [k.layer for k in knobs_for(gru_task.model)]
    assert "head" in gru_knobs
    assert ("rnn" in gru_knobs) == ("svd_rnn" in methods())


def test_dashboard_move_updates_readouts_and_artists_in_place(mlp_task, mlp_dashboard):
    before = state_bytes(mlp_task.model)
    d = mlp_dashboard
    artists = (d.tradeoff.current, d.tradeoff.trail)
    lines_before = len(d.tradeoff.ax.lines)
    image_before = d.view.widget.value
    state = d.set_rank("fc2", 6)
    assert state["plan"] == wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": 6})})
    expected = mlp_task.evaluate(wb.apply(mlp_task.model, state["plan"]))
    assert state["result"]["metric"] == expected
    assert f"{expected:.4f}" in d.readouts["accuracy"].value
    assert f"{state['result']['params']:,}" in d.readouts["params"].value
    assert "fc2 rank 6" in d.readouts["preview"].value and "output error" in d.readouts["preview"].value
    x, y = d.tradeoff.current.get_data()
    assert (x[0], y[0]) == pytest.approx((state["result"]["bytes"] / 1024, expected))
    assert (d.tradeoff.current, d.tradeoff.trail) == artists and len(d.tradeoff.ax.lines) == lines_before
    assert d.view.widget.value != image_before and d.view.widget.value[:4] == b"\x89PNG"
    assert d.error.value == ""
    # back to the maximum: the layer is dense again, the original numbers come back
    state = d.set_rank("fc2", d.sliders["fc2"].max)
    assert state["plan"] == wb.Plan({}) and state["result"]["params"] == d.base["params"]
    assert state_bytes(mlp_task.model) == before


def test_dashboard_shows_errors_as_a_message(mlp_dashboard):
    d = mlp_dashboard
    d.coalescer.submit({**d.ranks(), "fc1": 0})
    d.coalescer.wait()
    assert "rank=0" in d.error.value and "Traceback" not in d.error.value
    d.set_rank("fc1", 12)
    assert d.error.value == "" and d.state["ranks"]["fc1"] == 12


@pytest.mark.parametrize("fixture", ["cnn_task", "gru_task"])
def test_dashboard_works_for_other_digits_models(fixture, request):
    task = request.getfixturevalue(fixture)
    d = Dashboard(task, synchronous=True, reference=False)
    for knob in d.knobs:
        state = d.set_rank(knob.layer, 2)
    assert state["result"]["metric"] == task.evaluate(wb.apply(task.model, state["plan"]))
    assert set(state["plan"].layers) == {k.layer for k in d.knobs}


def test_spectra_figure_styles_only_inside():
    style_before = dict(matplotlib.rcParams)
    artists = spectra_figure({"a": np.array([3.0, 2.0, 1.0]), "b": np.array([1.0, 0.5])}, ranks={"a": 2})
    assert dict(matplotlib.rcParams) == style_before
    assert len(artists.spectrum_axes) == 2
    energy = artists.energy_axes[0].lines[0].get_ydata()
    assert energy == pytest.approx([9 / 14, 13 / 14, 1.0])
    update_rank_markers(artists, {"a": 1})
    assert list(artists.rank_markers["a"][0].get_xdata()) == [1, 1]


def test_tradeoff_updates_with_set_data_and_reports_when_the_view_grows():
    ax = Figure().subplots()
    artists = draw_tradeoff(ax, [10, 20], [0.5, 0.9], (30, 0.95))
    assert update_tradeoff(artists, (15, 0.7), trail=([15], [0.7])) is False
    assert list(artists.current.get_xdata()) == [15]
    assert update_tradeoff(artists, (80, 0.7)) is True
    assert ax.get_xlim()[1] >= 80
