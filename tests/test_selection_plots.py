"""The choosing and recovery charts stay readable: no overlapping tick labels or point labels, at most
`MAX_SERIES` legend entries, spectra clipped at their numerical zeros, one colour per recovery run."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from workbench.plotting import recovery, selection  # noqa: E402


def _no_overlap(texts, renderer) -> bool:
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_text() and t.get_visible()]
    return not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


@pytest.fixture
def figure():
    fig = plt.figure(figsize=(5.5, 3.5))
    yield fig
    plt.close(fig)


def test_heatmap_ticks_of_a_long_grid_do_not_overlap(figure):
    grid = (0.005, 0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 0.9)
    ax = figure.subplots()
    metric = np.linspace(0.2, 1.0, 3 * len(grid)).reshape(3, len(grid))
    selection.draw_sensitivity_heatmap(ax, grid, metric, ["fc1", "fc2", "fc3"], baseline=1.0)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert _no_overlap(ax.get_xticklabels(), renderer)
    assert _no_overlap([t for t in ax.texts], renderer)  # the cell annotations


def test_group_series_keeps_at_most_max_series_names():
    kinds = [f"m{i}" for i in range(15)] + ["m0"]
    grouped = selection.group_series(kinds, 8)
    assert len(set(grouped)) == 8 and grouped[:7] == kinds[:7] and set(grouped[7:15]) == {"other"}
    assert grouped[15] == "m0"
    assert selection.group_series(kinds[:8], 8) == kinds[:8]  # 8 names: unchanged


def test_pareto_chart_has_a_short_legend_and_labels_that_do_not_overlap(figure):
    rng = np.random.default_rng(0)
    n = 30
    x = np.concatenate([[2e4, 2.1e4, 2.2e4, 5e4, 5.2e4], rng.uniform(3e4, 6e5, n - 5)])
    y = np.concatenate([[0.33, 0.34, 0.36, 0.94, 0.95], rng.uniform(0.2, 0.93, n - 5)])
    front = [True] * 5 + [False] * (n - 5)
    methods = [f"method {i % 15}" for i in range(n)]
    ax = figure.subplots()
    artists = selection.draw_pareto(ax, x, y, [f"a long label number {i}" for i in range(n)], methods, front)
    figure.canvas.draw()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(legend) == 9 and "other" in legend and "Pareto front" in legend  # 8 series + the front
    notes = [a for a in artists if isinstance(a, matplotlib.text.Annotation)]
    assert len(notes) == 5 and _no_overlap(notes, figure.canvas.get_renderer())
    assert _no_overlap(ax.get_xticklabels(), figure.canvas.get_renderer())
    assert selection.compact_number(20000) == "20k" and selection.compact_number(0.2) == "0.2"


def test_pareto_chart_draws_the_latency_spread_as_error_bars(figure):
    ax = figure.subplots()
    x, y = [1.0, 2.0, 4.0], [0.9, 0.95, 0.97]
    spread = [(0.8, 1.5), None, (3.0, 6.0)]
    artists = selection.draw_pareto(ax, x, y, ["a", "b", "c"], ["m", "m", "n"], [True, True, True],
                                    annotate=False, spread=spread)
    bars = [a for a in artists if isinstance(a, matplotlib.container.ErrorbarContainer)]
    segments = sorted(tuple(map(tuple, seg)) for bar in bars for seg in bar.lines[2][0].get_segments())
    assert segments == [((0.8, 0.9), (1.5, 0.9)), ((3.0, 0.97), (6.0, 0.97))]  # point b has no spread: no bar
    plain = plt.figure().subplots()
    assert not [a for a in selection.draw_pareto(plain, x, y, ["a", "b", "c"], ["m", "m", "n"], [True] * 3,
                                                 annotate=False) if isinstance(a, matplotlib.container.ErrorbarContainer)]
    plt.close(plain.figure)


def test_spectra_are_clipped_at_the_floor(figure):
    ax = figure.subplots()
    s = np.array([4.0, 2.0, 1.0, 1e-3, 1e-16, 1e-17])  # two numerical zeros (constant-zero input columns)
    artists = selection.draw_ranks_on_spectra(ax, {"fc1": s}, {"uniform": {"fc1": 2}, "greedy": {"fc1": 5}})
    y = artists[0].get_ydata()
    assert np.allclose(y[:4], s[:4] / 4) and np.isnan(y[4:]).all()
    assert ax.get_ylim()[0] == pytest.approx(1e-6)
    assert len(artists) == 2  # the line and the uniform marker; greedy's rank 5 sits on a zero, not drawn


def test_recovery_runs_get_one_colour_each(figure):
    ax_loss, ax_metric = figure.subplots(1, 2)
    runs = [recovery.draw_curves(ax_loss, ax_metric, color=f"C{i}", label=name, legend=False)
            for i, name in enumerate(("svd", "prune", "quant"))]
    for run in runs:
        recovery.update_curves(run, [1, 2], [1.0, 0.5], [1.1, 0.6], [0.8, 0.9])
    colours = {matplotlib.colors.to_hex(r.metric.get_color()) for r in runs}
    assert len(colours) == 3
    assert all(r.loss.get_color() == r.val_loss.get_color() == r.metric.get_color() for r in runs)
    assert [r.metric.get_label() for r in runs] == ["svd", "prune", "quant"]
    single = recovery.draw_curves(*plt.figure().subplots(1, 2))  # the explorer's one-run default is unchanged
    assert single.loss.get_label() == "training loss" and single.metric.get_label() == "validation accuracy"
