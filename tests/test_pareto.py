"""Pareto front against brute-force dominance; advisor choices and explanations; real measurements."""
import random

import numpy as np
import pytest

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.measure import latency_spread
from workbench.select import pareto
from workbench.select.pareto import Point, advise, collect_points, pareto_front


def synthetic(n=30, seed=0):
    rng = random.Random(seed)
    return [Point("m", f"p{i}", rng.random(), 1, rng.randint(1000, 100_000), latency_ms=rng.random())
            for i in range(n)] + [Point("original", "original", 0.99, 1, 200_000, latency_ms=1.0)]


@pytest.mark.parametrize("x", ["bytes", "latency_ms"])
def test_front_is_exactly_the_non_dominated_points(x):
    points = synthetic()
    front = pareto_front(points, x)

    def dominated(p):
        return any(getattr(q, x) <= getattr(p, x) and q.metric >= p.metric
                   and (getattr(q, x) < getattr(p, x) or q.metric > p.metric) for q in points)

    assert {p.label for p in front} == {p.label for p in points if not dominated(p)}
    assert [getattr(p, x) for p in front] == sorted(getattr(p, x) for p in front)


def test_advisor_picks_and_explains():
    points = synthetic()
    advice = advise(points, max_bytes=50_000)
    fitting = [p for p in points if p.bytes <= 50_000]
    assert advice.choice.metric == max(p.metric for p in fitting)
    assert "at most 48.8 kB" in advice.reason and advice.choice.label in advice.reason
    floor = advise(points, min_metric=0.5)
    assert floor.choice.bytes == min(p.bytes for p in points if p.metric >= 0.5)
    none = advise(points, max_bytes=10)
    assert none.choice is None and "No measured option" in none.reason
    with pytest.raises(WorkbenchError, match="at least one constraint"):
        advise(points)


def test_collect_points_measures_for_real(mlp_task):
    points, skipped = collect_points(mlp_task, methods=["svd"], recovery=False, allocations=(0.3,),
                                     latency=False, progress=False)
    labels = [p.label for p in points]
    assert labels[0] == "original" and "svd(ratio=0.3)" in labels
    svd = points[labels.index("svd(ratio=0.3)")]
    model = wb.apply(mlp_task.model, wb.registry.get_recipe("svd")(mlp_task.model, ratio=0.3))
    measured = wb.measure(model, mlp_task, latency=False)
    assert (svd.metric, svd.params, svd.bytes) == (measured["metric"], measured["params"], measured["bytes"])
    greedy = next(p for p in points if p.method == "svd greedy")
    assert greedy.metric > svd.metric  # the allocation beats the uniform ratio at the same budget
    assert skipped == []


def test_collect_points_records_median_and_quartiles_after_warmup(mlp_task, monkeypatch):
    calls = []

    def fake_samples(model, example, repeats, warmup):  # known timings: the oracle is exact
        calls.append((repeats, warmup))
        return [10.0, 1.0, 4.0, 2.0, 3.0, 9.0, 5.0]

    monkeypatch.setattr(pareto, "latency_samples", fake_samples)
    points, _ = collect_points(mlp_task, methods=["int8"], combinations=False, allocations=(), recovery=False,
                               latency_repeats=7, progress=False)
    assert calls and all(call == (7, pareto.LATENCY_WARMUP) for call in calls) and pareto.LATENCY_WARMUP > 0
    q1, median, q3 = np.percentile([10.0, 1.0, 4.0, 2.0, 3.0, 9.0, 5.0], [25, 50, 75])
    for point in points:
        assert (point.latency_q1_ms, point.latency_ms, point.latency_q3_ms) == pytest.approx((q1, median, q3))
    # the fields are added, none renamed: positional construction and the old keys still work
    row = Point("m", "p", 0.9, 1, 2, 3, 4.0, {"a": 1}).to_dict()
    assert row["latency_ms"] == 4.0 and row["settings"] == {"a": 1} and row["latency_q1_ms"] is None


def test_latency_spread_matches_numpy_percentiles():
    samples = list(np.random.default_rng(0).exponential(2.0, 40))
    assert tuple(latency_spread(samples).values()) == pytest.approx(np.percentile(samples, [50, 25, 75]))
    assert latency_spread([3.0]) == {"median_ms": 3.0, "q1_ms": 3.0, "q3_ms": 3.0}
    with pytest.raises(WorkbenchError, match="at least one timing"):
        latency_spread([])


def test_family_summary_picks_the_best_and_the_smallest_close_point():
    from workbench.select.pareto import Point, family_summary
    pts = [Point("original", "original", 0.97, 100, 1000),
           Point("svd", "svd a", 0.96, 50, 500), Point("svd greedy", "svd b", 0.90, 20, 200),
           Point("prune", "prune s", 0.965, 40, 400, settings={"structured": True}),
           Point("quant", "q8", 0.97, 100, 300), Point("svd+int8", "combo", 0.5, 10, 100)]
    rows = {r["family"]: r for r in family_summary(pts, within=0.01)}
    assert set(rows) == {"low rank", "structured pruning", "quantization", "combination"}
    assert rows["low rank"]["points"] == 2 and rows["low rank"]["best"] == "svd a"
    assert rows["low rank"]["smallest within"] == "svd a" and rows["low rank"]["of original"] == 0.5
    assert rows["combination"]["smallest within"] is None
