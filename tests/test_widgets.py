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
from workbench.kernels.svd import breakeven_rank
from workbench.layers.lowrank import LowRankLinear
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


def test_dashboard_marks_breakeven_and_says_when_a_rank_builds_a_layer_larger_than_dense(mlp_task, gru_task):
    d = Dashboard(mlp_task, synchronous=True, reference=False)
    shapes = {info.name: info.shape for info in matrix_layers(mlp_task.model)}
    for knob in d.knobs:  # the break-even rank is on every slider; dense at the right end
        assert knob.breakeven == breakeven_rank(shapes[knob.layer]) > 0
        slider = d.sliders[knob.layer]
        assert f"(break-even {knob.breakeven})" in slider.description
        assert slider.value == slider.max == knob.maximum and slider.min == 1
    (m, n), b = shapes["fc2"], d.knobs[1].breakeven
    state = d.set_rank("fc2", b)  # at break-even: factors, fewer weights than dense, no warning
    assert state["result"]["params"] - d.base["params"] == b * (m + n) - m * n < 0
    assert "larger than dense" not in d.readouts["size"].value
    rank = b + 20  # above: the engine builds factors all the same, with MORE weights than the dense layer
    state = d.set_rank("fc2", rank)
    assert state["plan"] == wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": rank})})
    assert isinstance(wb.apply(mlp_task.model, state["plan"]).fc2, LowRankLinear)
    assert state["result"]["params"] - d.base["params"] == rank * (m + n) - m * n > 0
    size = d.readouts["size"].value
    assert "larger than dense" in size and f"fc2 rank {rank} &gt; break-even {b}" in size
    assert f"{rank * (m + n) / (m * n):.0%} of its dense weights" in size
    assert "fc2" not in wb.get_recipe("svd")(mlp_task.model, ranks={"fc2": rank}).layers  # the recipe: dense
    d.set_rank("fc2", d.sliders["fc2"].max)  # dense again: no warning
    assert "larger than dense" not in d.readouts["size"].value
    # a recurrent knob: its break-even is the last per-gate rank storing fewer weights than both dense sides
    for knob in (k for k in knobs_for(gru_task.model) if k.weights is not None and k.layer == "rnn"):
        assert knob.weights(knob.breakeven) < knob.dense_weights <= knob.weights(knob.breakeven + 1)


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


# --------------------------------------------------------------------------- one explorer contract
def _figure_bytes(explorer):
    return explorer.view.widget.value if explorer.view is not None else None


def check_explorer_contract(explorer, control, value, readout, bad: dict, match: str) -> None:
    """What every explorer promises: a control move changes the plan, the readout and the figure
    (computed through the coalescer, here synchronous); ``set_plan(explorer.plan)`` round-trips;
    a bad value shows a message on the error line and changes nothing; a plan the controls cannot
    show is refused with the controls untouched."""
    plan, text, image = explorer.plan, readout(), _figure_bytes(explorer)
    control.value = value
    moved, text_moved, image_moved = explorer.plan, readout(), _figure_bytes(explorer)
    assert moved != plan and text_moved != text and explorer.error.value == ""
    if explorer.view is not None:
        assert image_moved != image and image_moved[:4] == b"\x89PNG"

    explorer.set_plan(moved)  # the save/load protocol: the same plan, the same display
    assert explorer.plan == moved and readout() == text_moved and explorer.error.value == ""
    state, settings, image = explorer.state, explorer.settings(), _figure_bytes(explorer)

    explorer.request(**bad)  # as if a control could take the bad value
    assert match in explorer.error.value and "Traceback" not in explorer.error.value, explorer.error.value
    assert explorer.settings() == settings and explorer.plan == moved
    assert explorer.state is state and readout() == text_moved and _figure_bytes(explorer) == image
    explorer.request()  # the next good result clears the line
    assert explorer.error.value == "" and readout() == text_moved

    with pytest.raises(WorkbenchError):
        explorer.set_plan(wb.Plan({"no-such-layer": wb.LayerPlan("svd", {"rank": 1})}))
    assert explorer.plan == moved


def test_dashboard_follows_the_explorer_contract(mlp_task):
    d = Dashboard(mlp_task, synchronous=True, reference=False)
    check_explorer_contract(d, d.sliders["fc2"], 6, lambda: d.readouts["params"].value + d.readouts["accuracy"].value,
                            {"fc1": 0}, "rank=0")


def test_pruning_explorer_follows_the_explorer_contract(mlp_task):
    from workbench.widgets.pruning import PruningExplorer
    e = PruningExplorer(mlp_task, synchronous=True)
    check_explorer_contract(e, e.threshold, 0.04, lambda: e.summary.value, {"threshold": 100.0}, "prunes every weight")


def test_quantization_explorer_follows_the_explorer_contract(mlp_task):
    from workbench.widgets.quantization import QuantizationExplorer
    e = QuantizationExplorer(mlp_task, bits=1, synchronous=True)
    check_explorer_contract(e, e.bits, 2, lambda: e.summary.value, {"bits": 0}, "bits=0")


def test_tucker_explorer_follows_the_explorer_contract(cnn_task):
    from workbench.widgets.conv_rnn import TuckerExplorer
    e = TuckerExplorer(cnn_task, "conv2", rank_out=8, rank_in=8, latency_repeats=1, synchronous=True)
    check_explorer_contract(e, e.rank_in, 4, lambda: e.readout.value, {"rank_out": 999}, "rank")


def test_tucker_explorer_draws_each_modes_spectrum_with_the_chosen_rank(cnn_task):
    """The figure: per channel mode, the chosen rank, sigma^2 kept (oracle: the unfolding's
    singular values from torch) and the break-even rank at the other mode's rank (oracle: the
    weight count `tucker_params` crosses the dense kernel's there). A rank slider move changes the PNG."""
    import torch

    from workbench.kernels.tensor import tucker_params
    from workbench.widgets.conv_rnn import TuckerExplorer
    e = TuckerExplorer(cnn_task, "conv2", rank_out=24, rank_in=12, latency_repeats=1, synchronous=True)
    kernel = cnn_task.model.conv2.weight.detach().double()
    shape, dense = tuple(kernel.shape), kernel.numel()
    before = e.view.png()
    assert before[:4] == b"\x89PNG"
    e.rank_out.value = 5
    assert e.view.png() != before and e.error.value == ""
    for mode, axis, rank, other in (("out", 0, 5, 12), ("in", 1, 12, 5)):
        parts = e.artists[mode]
        s = torch.linalg.svdvals(kernel.movedim(axis, 0).reshape(shape[axis], -1))
        kept = float((s[:rank] ** 2).sum() / (s ** 2).sum())
        assert list(parts["rank"].get_xdata()) == [rank, rank]
        assert f"rank {rank} of {shape[axis]}: {kept:.1%}" in parts["energy"].get_text()
        limit = parts["break_even"].get_xdata()[0]
        ranks = (lambda r: (r, other)) if mode == "out" else (lambda r: (other, r))
        assert tucker_params(shape, ranks(limit)) < dense <= tucker_params(shape, ranks(limit + 1))
        assert parts["break_even"].get_visible() == (limit < shape[axis])


def test_gate_rank_explorer_follows_the_explorer_contract(gru_task):
    from workbench.widgets.conv_rnn import GateRankExplorer
    e = GateRankExplorer(gru_task, "rnn", rank_ih=3, rank_hh=16, latency_repeats=1, synchronous=True)
    check_explorer_contract(e, e.rank_hh, 8, lambda: e.readout.value, {"rank_ih": 10_000}, "10000")
    assert list(e.markers["hh"].get_xdata()) == [8, 8]


@pytest.mark.slow
def test_real_model_explorer_follows_the_explorer_contract():
    real_model = pytest.importorskip("workbench.widgets.real_model")
    e = real_model.RealModelExplorer(wb.load("minilm"), calibration_sequences=4, eval_sentences=6,
                                     synchronous=True)
    check_explorer_contract(e, e.ratio, 0.5, lambda: e.readout.value + e.similarity.value, {"mode": "svd"},
                            "mode='svd'")
    original, compressed = e.similarities()
    assert f"compressed {compressed:.3f}" in e.similarity.value and -1.0 <= original <= 1.0 + 1e-6
    # the figure: each encoder Linear's rank at the slider's ratio (oracle: rank_for_ratio of its weight shape)
    from workbench.kernels.svd import rank_for_ratio
    from workbench.zoo import minilm
    shown = e.view.png()
    e.ratio.value = 0.3
    assert e.view.png() != shown and "at 30% of its weights" in e.heatmap.axes.get_title()
    texts = iter(e.heatmap.axes.texts)
    for block in range(len(e.names) // len(minilm.LAYER_TYPES)):
        for kind in minilm.LAYER_TYPES:
            name = next(n for n in e.names if minilm.block_of(n) == block and minilm.layer_type(n) == kind)
            weight = e.task.model.get_submodule(name).weight
            assert next(texts).get_text() == str(rank_for_ratio(tuple(weight.shape), 0.3)), name


def test_layer_grid_places_each_minilm_layer_by_block_and_type_and_the_heatmap_follows():
    from workbench.plotting.heatmaps import draw_rank_heatmap, update_rank_heatmap
    from workbench.widgets.real_model import layer_grid
    from workbench.zoo import minilm
    values = {f"bert.encoder.layer.{b}.{suffix}": 10 * b + t for b in (1, 0)
              for t, suffix in enumerate(("attention.self.query", "attention.self.key", "attention.self.value",
                                          "attention.output.dense", "intermediate.dense", "output.dense"))}
    grid, rows, cols = layer_grid(values)
    assert rows == ["block 0", "block 1"] and cols == list(minilm.LAYER_TYPES)
    assert grid.tolist() == [[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]]
    ax = Figure().subplots()
    image = draw_rank_heatmap(ax, grid, rows, cols, vmin=0, vmax=20)
    update_rank_heatmap(image, grid[::-1], title="moved")
    assert [t.get_text() for t in ax.texts] == [f"{v:.0f}" for v in grid[::-1].ravel()]
    assert image.get_clim() == (0, 20) and ax.get_title() == "moved"
    with pytest.raises(ValueError, match="shape"):
        update_rank_heatmap(image, grid[:1])


def test_recovery_explorer_follows_the_explorer_contract(mlp_task):
    from workbench.widgets.recovery import RecoveryExplorer
    plans = {"fc2 rank 4": wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": 4})}),
             "fc1 rank 8": wb.Plan({"fc1": wb.LayerPlan("svd", {"rank": 8})})}
    e = RecoveryExplorer(mlp_task, plans, epochs=2, background=False)
    image, status = _figure_bytes(e), e.status.value
    e.choice.value = "fc1 rank 8"
    assert e.plan == plans["fc1 rank 8"]
    e.finetune_button.click()  # the computation a button starts, through the coalescer
    assert e.status.value != status and "fc1 rank 8" in e.status.value and e.error.value == ""
    assert _figure_bytes(e) != image and e.state["label"] == "fc1 rank 8" and len(e.results) == 1
    e.set_plan(e.plan)
    assert e.plan == plans["fc1 rank 8"] and e.choice.value == "fc1 rank 8"
    state = e.state
    e.request(kind="finetune", epochs=0)
    assert "epochs=0" in e.error.value and e.state is state and len(e.results) == 1
    assert e.plan == plans["fc1 rank 8"] and not e.finetune_button.disabled


def test_latency_is_measured_only_when_asked(cnn_task, monkeypatch):
    from workbench.widgets import conv_rnn
    timed = []  # inclusive quartiles of these five samples: 1.25, 1.5 (median), 1.75 (exclusive: 1.125, 1.875)
    monkeypatch.setattr(conv_rnn, "latency_samples", lambda model, x, repeats, warmup: timed.append(repeats) or
                        [2.0, 1.0, 1.5, 1.75, 1.25])
    e = conv_rnn.TuckerExplorer(cnn_task, "conv2", rank_out=8, rank_in=8, latency_repeats=3, synchronous=True)
    e.rank_in.value = 4
    assert timed == [] and e.after["latency_ms"] is None and "measure latency" in e.readout.value
    e.latency_button.click()  # the original and the shown plan, once each
    assert timed == [3, 3] and e.after["latency_ms"] == 1.5 and e.before["latency_ms"] == 1.5
    assert "<td>1.500 [1.250–1.750]</td>" in e.readout.value and "100%" in e.readout.value
    assert e.latency_spread()["compressed"] == {"median_ms": 1.5, "q1_ms": 1.25, "q3_ms": 1.75}
    e.rank_in.value = 5
    e.rank_in.value = 4  # moving back shows the figure measured for that plan, no new runs
    assert timed == [3, 3] and e.after["latency_ms"] == 1.5


def test_explorer_computes_off_the_ui_thread_and_ends_on_the_last_value(gru_task):
    from workbench.widgets.conv_rnn import GateRankExplorer
    e = GateRankExplorer(gru_task, "rnn", rank_ih=3, rank_hh=16, latency_repeats=1)  # a worker thread
    threads = []
    compute = e.compute
    e.compute = lambda settings: threads.append(threading.current_thread()) or compute(settings)
    e.coalescer.compute = e.compute
    for rank in (4, 5, 6, 7, 8):
        e.rank_hh.value = rank
    assert e.wait()["settings"]["rank_hh"] == 8
    assert threads and all(t is not threading.main_thread() for t in threads)
    assert e.plan.layers["rnn"]["rank_hh"] == 8 and list(e.markers["hh"].get_xdata()) == [8, 8]


def test_figure_image_redraws_or_blits():
    from workbench.widgets.figure_view import FigureImage
    view = FigureImage((2, 1), dpi=50)
    ax = view.figure.subplots()
    (line,) = ax.plot([0, 1], [0, 1])
    view.draw()
    full = view.widget.value
    assert full[:4] == b"\x89PNG" and view.widget.layout.width == "100px"
    line.set_ydata([1, 0])
    view.draw((line,))  # background kept without the moving line, the line drawn over it
    blitted = view.widget.value
    line.set_ydata([0, 1])
    view.draw((line,))
    assert blitted != full and view.widget.value != blitted


def test_widgets_package_exports_every_explorer_lazily():
    import subprocess
    import sys
    code = ("import sys, workbench.widgets as w; assert 'ipywidgets' not in sys.modules, 'eager'; "
            "names = ['Dashboard', 'PruningExplorer', 'QuantizationExplorer', 'TuckerExplorer', "
            "'GateRankExplorer', 'RecoveryExplorer', 'RealModelExplorer', 'BudgetExplorer', 'Coalescer']; "
            "assert all(n in dir(w) for n in names); "
            "from workbench.widgets.explorer import Explorer; "
            "assert all(issubclass(getattr(w, n), Explorer) for n in names[:-1])")
    subprocess.run([sys.executable, "-c", code], check=True)



def test_displayed_explorer_carries_its_figure_as_png_beside_the_widget_view(mlp_task):
    """Static readers (GitHub, nbviewer, the docs' lesson pages) see ``image/png``; live front ends
    get the widget view they render first. The PNG is the figure as shown now, after a move too."""
    import base64

    from IPython.core.formatters import DisplayFormatter
    d = Dashboard(mlp_task, synchronous=True, reference=False)
    formatter = DisplayFormatter()
    data, _ = formatter.format(d)
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == d.model_id
    assert base64.b64decode(data["image/png"]) == d.view.widget.value and d.view.widget.value[:4] == b"\x89PNG"
    before = d.view.widget.value
    d.set_rank("fc2", 3)
    data, _ = formatter.format(d)
    assert d.view.widget.value != before and base64.b64decode(data["image/png"]) == d.view.widget.value
