"""A lower-is-better metric (a perplexity, an error rate) is handled wherever a metric is compared:
fine-tuning keeps the best epoch in the task's direction, sensitivity's drop is the loss of
quality (a perplexity's rise), the allocators minimise it, the Pareto front, the family summary
and the advisor prefer lower values, and the dashboard says which way is better. Causal language
models from `transformers` configs (random weights, nothing downloaded) fine-tune and distil on
shifted next-token cross-entropy."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import workbench as wb
from conftest import state_bytes
from workbench.recovery import finetune, validation_split
from workbench.recovery.distill import distillation_loss, hard_loss, next_token_loss
from workbench.recovery.finetune import quality_key
from workbench.inventory import matrix_layers
from workbench.select._allocate import convex_picks, greedy_picks, option_table
from workbench.select._sensitivity import SensitivityResult, quality_loss
from workbench.select.pareto import Point, advise, family_summary, pareto_front
from workbench.zoo.task import CheckedMetric
from workbench.zoo.user import perplexity

transformers = pytest.importorskip("transformers")


# ---- a tiny GPT-2 as the user's causal LM ----------------------------------------------------

@pytest.fixture(scope="module")
def lm_task():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 64, (48, 16))
    return wb.load(model, eval_data=ids, train_data=ids)


@pytest.fixture(scope="module")
def lm_small(lm_task):
    return wb.apply(lm_task.model, wb.recipe("svd")(lm_task.model, ratio=0.3))


def validation_metrics(task, model, seed=0, val_fraction=0.15):
    """The task metric of ``model`` on the validation split fine-tuning holds out (the oracle)."""
    *_, x_val, y_val = validation_split(task.train_inputs, task.train_targets, val_fraction, seed)
    return float(task.metric(task.outputs(model, inputs=x_val), y_val))


def test_causal_lm_task_is_marked_for_next_token_training(lm_task):
    assert lm_task.higher_is_better is False and lm_task.extras["causal_lm"] is True
    assert torch.equal(lm_task.train_targets, lm_task.train_inputs)


def test_next_token_loss_is_the_log_of_perplexity():
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(3))
    logp = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])
    expected = -float(logp.mean())                               # hand computation, float64
    assert float(next_token_loss(logits, ids)) == pytest.approx(expected, rel=1e-6)
    assert float(hard_loss(logits, ids, causal_lm=True)) == pytest.approx(expected, rel=1e-6)
    assert math.exp(expected) == pytest.approx(perplexity(logits, ids), rel=1e-6)
    with pytest.raises(wb.WorkbenchError, match=r"logits \(n, T, V\) and token ids \(n, T\)"):
        next_token_loss(logits, ids[:, :4])
    # distillation of one model onto itself: the soft loss is 0, what is left is the hard part
    assert float(distillation_loss(logits, logits, ids, 2.0, 0.5, causal_lm=True)) == pytest.approx(
        0.5 * expected, rel=1e-5)


@pytest.mark.parametrize("how", ["finetune", "distill"])
def test_finetune_gpt2_lowers_perplexity_and_keeps_the_lowest_epoch(lm_task, lm_small, how):
    before = state_bytes(lm_small)
    run = (wb.finetune(lm_small, lm_task, epochs=2, progress=False) if how == "finetune"
           else wb.distill_finetune(lm_small, lm_task, epochs=2, progress=False))
    assert state_bytes(lm_small) == before                      # the input is not modified
    values = [run.start["metric"]] + [h["metric"] for h in run.history]
    losses = [run.start["val_loss"]] + [h["val_loss"] for h in run.history]
    assert all(math.isfinite(v) and 1 < v < 200 for v in values)
    # oracle: the kept epoch has the lowest validation perplexity (ties: the lower loss)
    assert run.best_epoch == min(range(len(values)), key=lambda e: (values[e], losses[e]))
    assert values[run.best_epoch] <= run.start["metric"]        # never worse than where it started
    # the returned model is the kept epoch, re-packed: its validation perplexity is the recorded one
    assert validation_metrics(lm_task, run.model) == pytest.approx(values[run.best_epoch], rel=1e-4)
    # the recorded val_loss is the shifted next-token cross-entropy: log of the perplexity
    assert losses[run.best_epoch] == pytest.approx(math.log(values[run.best_epoch]), rel=1e-4)
    if how == "finetune":
        assert run.best_epoch > 0 and values[run.best_epoch] < run.start["metric"]


def test_sensitivity_drop_is_the_perplexity_rise(lm_task):
    layers = [info.name for info in matrix_layers(lm_task.model)][:2]
    result = wb.sensitivity(lm_task, "svd", (0.05, 0.5), layers=layers, progress=False)
    assert result.higher_is_better is False and len(result.layers) == 2
    finite = 0
    for i, layer in enumerate(result.layers):
        for j, value in enumerate(result.curve(layer)):
            if math.isnan(value):
                continue
            assert result.drop(i, j) == pytest.approx(value - result.baseline)
            assert (result.drop(i, j) > 0) == (value > result.baseline)   # worse perplexity: positive
            finite += 1
        assert result.drops(layer) == [result.drop(i, j) for j in range(len(result.grid))]
    assert finite > 0
    every = [d for layer in result.layers for d in result.drops(layer) if math.isfinite(d)]
    assert any(d > 0 for d in every)          # a rise is seen (and scored as a loss) on this model
    frame_drops = result.to_frame()["drop"].tolist()
    assert frame_drops == pytest.approx([d for layer in result.layers for d in result.drops(layer)], nan_ok=True)
    again = SensitivityResult.from_dict(result.to_dict())
    assert again.higher_is_better is False and again.drops(layers[0]) == pytest.approx(result.drops(layers[0]),
                                                                                        nan_ok=True)
    # the allocator's predicted loss of each option is that rise (never a fall), not baseline - metric
    table = option_table(result, "params")
    for i, layer in enumerate(result.layers):
        expected = sorted(max(0.0, d) for d in result.drops(layer) if math.isfinite(d))
        assert sorted(float(x) for x in table.losses[i][1:]) == pytest.approx(expected, abs=1e-3)


# ---- selection on a synthetic lower-is-better result ---------------------------------------

def synthetic_result(higher_is_better: bool) -> SensitivityResult:
    """Two layers, two options each (cost 4 and 8 of a dense 10); metric values chosen so that
    the better option in the metric's direction is known."""
    base = 10.0
    # layer a: option 0 is 3 worse, option 1 is 1 worse; layer b: 0.5 and 0.1 worse
    worse = [[3.0, 1.0], [0.5, 0.1]]
    metric = [[base - w if higher_is_better else base + w for w in row] for row in worse]
    choices = [[wb.LayerPlan("svd", {"rank": r}) for r in (1, 2)] for _ in range(2)]
    costs = {c: [[4, 8], [4, 8]] for c in ("params", "bytes", "flops")}
    dense = {c: [10, 10] for c in costs}
    return SensitivityResult("svd", "ratio", [0.2, 0.5], ["a", "b"], metric, choices, costs, dense,
                             {c: 0 for c in costs}, base, "m", "validation", {c: 20 for c in costs},
                             higher_is_better)


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_allocators_minimise_the_loss_of_quality_in_either_direction(higher_is_better):
    result = synthetic_result(higher_is_better)
    assert result.drop(0, 0) == pytest.approx(3.0) and result.drop(1, 1) == pytest.approx(0.1)
    table = option_table(result, "params")
    # predicted losses (minus the tie-break) are the quality losses, the same in both directions
    assert [float(x) for x in table.losses[0][1:]] == pytest.approx([3.0, 1.0], abs=1e-3)
    assert [float(x) for x in table.losses[1][1:]] == pytest.approx([0.5, 0.1], abs=1e-3)
    # 14 of 20 params: one layer at cost 4, the other at 10 (dense) or both at 8 (16: too big);
    # compressing b (0.5 worse) beats compressing a (3 worse)
    picks = greedy_picks(table, 14)
    assert table.cost_of(picks) <= 14 and picks == [0, 1]
    pytest.importorskip("cvxpy")
    assert convex_picks(table, 14)[0] == picks


def test_quality_loss_and_epoch_key_follow_the_direction():
    assert quality_loss(0.9, 0.8) == pytest.approx(0.1) and quality_loss(10.0, 12.0, False) == pytest.approx(2.0)
    hi = type("T", (), {"higher_is_better": True})()
    lo = type("T", (), {"higher_is_better": False})()
    assert quality_key(hi, 0.9, 1.0) > quality_key(hi, 0.8, 1.0)
    assert quality_key(lo, 8.0, 1.0) > quality_key(lo, 9.0, 1.0)
    assert quality_key(lo, 8.0, 0.5) > quality_key(lo, 8.0, 1.0)        # ties: the lower loss


def test_finetune_with_an_error_rate_keeps_the_same_epoch_as_with_accuracy(mlp_task):
    """Oracle: error = 1 - accuracy with higher_is_better=False orders every epoch the same way
    as the accuracy does, so the kept epoch and the result are identical."""
    small = wb.apply(mlp_task.model, wb.Plan({"fc1": wb.LayerPlan("svd", {"rank": 2}),
                                              "fc2": wb.LayerPlan("svd", {"rank": 2})}))

    def error_rate(outputs, targets):
        return 1.0 - float((outputs.argmax(-1) == targets).float().mean())

    errors = dataclasses.replace(mlp_task, metric=CheckedMetric(error_rate, "error rate"),
                                 metric_name="error rate", higher_is_better=False)
    options = dict(epochs=4, lr=3e-2, patience=None, progress=False)
    by_accuracy, by_error = finetune(small, mlp_task, **options), finetune(small, errors, **options)
    assert [1 - h["metric"] for h in by_accuracy.history] == pytest.approx([h["metric"] for h in by_error.history])
    errors_seen = [by_error.start["metric"]] + [h["metric"] for h in by_error.history]
    losses = [by_error.start["val_loss"]] + [h["val_loss"] for h in by_error.history]
    assert by_error.best_epoch == min(range(len(errors_seen)), key=lambda e: (errors_seen[e], losses[e]))
    assert by_error.best_epoch == by_accuracy.best_epoch
    assert state_bytes(by_error.model) == state_bytes(by_accuracy.model)


# ---- Pareto, family summary and advice ------------------------------------------------------

def synthetic_points(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return ([Point("original", "original", 20.0, 1, 200_000, latency_ms=1.0)]
            + [Point("svd" if i % 2 else "quant", f"p{i}", float(rng.uniform(20, 60)), 1,
                     int(rng.integers(1000, 100_000)), latency_ms=float(rng.random())) for i in range(n)])


@pytest.mark.parametrize("x", ["bytes", "latency_ms"])
def test_lower_is_better_front_is_exactly_the_non_dominated_points(x):
    points = synthetic_points()
    front = pareto_front(points, x, higher_is_better=False)

    def dominated(p):
        return any(getattr(q, x) <= getattr(p, x) and q.metric <= p.metric
                   and (getattr(q, x) < getattr(p, x) or q.metric < p.metric) for q in points)

    assert {p.label for p in front} == {p.label for p in points if not dominated(p)}
    assert [getattr(p, x) for p in front] == sorted(getattr(p, x) for p in front)
    assert front != pareto_front(points, x)                        # the direction matters


def test_family_summary_and_advice_prefer_lower_values():
    pts = [Point("original", "original", 20.0, 100, 1000),
           Point("svd", "svd a", 21.0, 50, 500), Point("svd", "svd b", 30.0, 20, 200),
           Point("quant", "quant a", 20.5, 40, 250), Point("quant", "quant b", 50.0, 10, 100)]
    rows = {r["family"]: r for r in family_summary(pts, within=1.0, higher_is_better=False)}
    assert rows["low rank"]["best"] == "svd a" and rows["quantization"]["best"] == "quant a"
    assert rows["low rank"]["smallest within"] == "svd a"            # 21 <= 20 + 1; 30 is not
    assert rows["quantization"]["smallest within"] == "quant a"
    ceiling = advise(pts, min_metric=25.0, metric_name="perplexity", higher_is_better=False)
    assert ceiling.choice.label == "quant a"                        # the smallest with perplexity <= 25
    assert "perplexity at most 25.000" in ceiling.reason and "ceiling" in ceiling.reason
    capped = advise(pts, max_bytes=300, metric_name="perplexity", higher_is_better=False)
    assert capped.choice.label == "quant a"                         # the lowest perplexity within 300 bytes
    assert [p.label for p in capped.candidates] == ["quant a", "svd b", "quant b"]
    none = advise(pts, min_metric=5.0, metric_name="perplexity", higher_is_better=False)
    assert none.choice is None and "The closest is original" in none.reason


# ---- the dashboard says which way is better ---------------------------------------------------

def test_dashboard_says_lower_is_better(mlp_task):
    pytest.importorskip("ipywidgets")
    from workbench.widgets.dashboard import Dashboard

    lower = dataclasses.replace(mlp_task, higher_is_better=False, metric_name="error")
    d = Dashboard(lower, synchronous=True, reference=False)
    d.set_rank("fc2", 6)
    assert "lower is better" in d.readouts["accuracy"].value
    assert d.tradeoff.current.axes.get_ylabel() == "error (lower is better)"
    higher = Dashboard(mlp_task, synchronous=True, reference=False)
    assert "higher is better" in higher.readouts["accuracy"].value


def test_the_sensitivity_heatmap_shows_a_perplexity_rise_as_a_positive_loss():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workbench.plotting.selection import draw_sensitivity_heatmap

    fig, ax = plt.subplots()
    image = draw_sensitivity_heatmap(ax, [0.5, 0.9], [[12.0, 10.5]], ["fc"], baseline=10.0, higher_is_better=False)
    assert image.get_array().tolist() == [[2.0, 0.5]]
    fig, ax = plt.subplots()
    image = draw_sensitivity_heatmap(ax, [0.5, 0.9], [[0.80, 0.95]], ["fc"], baseline=0.97)
    assert image.get_array().tolist()[0] == pytest.approx([0.17, 0.02])
    plt.close("all")
