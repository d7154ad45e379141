"""Convex constrained refit: reference solvers, constraints met, sparsity exact, beats magnitude."""
import numpy as np
import pytest
import torch
from scipy.optimize import lsq_linear

from workbench.errors import WorkbenchError
from workbench.kernels import convex


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    w = torch.randn(3, 12, generator=g, dtype=torch.float64)
    return x, x @ w.T, w


def test_large_l1_ball_gives_least_squares(problem):
    x, y, w = problem
    solved = convex.constrained_refit(x, y, "l1", radius=10 * float(w.abs().sum()))
    assert torch.allclose(solved, w, atol=1e-4)


def test_l1_ball_is_respected(problem):
    x, y, w = problem
    radius = 0.5 * float(w.abs().sum())
    solved = convex.constrained_refit(x, y, "l1", radius=radius)
    assert float(solved.abs().sum()) <= radius * (1 + 1e-4)


def test_box_matches_scipy_lsq_linear(problem):
    x, y, w = problem
    solved = convex.constrained_refit(x, y, "box", lower=-0.5, upper=0.5)
    for row in range(3):
        ref = lsq_linear(x.numpy(), y[:, row].numpy(), bounds=(-0.5, 0.5), tol=1e-12).x
        assert np.allclose(solved[row].numpy(), ref, atol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_constrained_prune_beats_magnitude_at_equal_sparsity(problem, sparsity):
    x, y, w = problem
    pruned = convex.constrained_prune(x, y, w, sparsity)
    magnitude = w * convex.magnitude_mask(w, sparsity)
    assert int((pruned != 0).sum()) == int((magnitude != 0).sum()) == round((1 - sparsity) * w.numel())
    assert convex.relative_output_error(x, y, pruned) < convex.relative_output_error(x, y, magnitude)


def test_refit_on_support_is_least_squares(problem):
    x, y, w = problem
    mask = convex.magnitude_mask(w, 0.5)
    fit = convex.refit_on_support(x, y, mask)
    for row in range(3):
        kept = mask[row].numpy()
        ref = np.linalg.lstsq(x.numpy()[:, kept], y[:, row].numpy(), rcond=None)[0]
        assert np.allclose(fit[row].numpy()[kept], ref) and (fit[row].numpy()[~kept] == 0).all()


@pytest.mark.parametrize("kwargs, message", [
    ({"constraint": "l1"}, "radius=None"), ({"constraint": "box", "lower": 1, "upper": 0}, "lower < upper"),
    ({"constraint": "l2"}, "constraint='l2'"),
])
def test_bad_settings(problem, kwargs, message):
    x, y, _ = problem
    with pytest.raises(WorkbenchError, match=message):
        convex.constrained_refit(x, y, **kwargs)
    with pytest.raises(WorkbenchError, match="sparsity=1.0"):
        convex.magnitude_mask(problem[2], 1.0)


def test_layer_comparison_on_digits(mlp_task):
    from workbench.select.constrained import compare_on_layer

    result = compare_on_layer(mlp_task, "fc3", 0.8, n_inputs=256)
    assert result["nonzeros"] == round(0.2 * 2560)
    assert result["convex"]["output_error"] < result["magnitude"]["output_error"]
    assert result["convex"]["metric"] > 0.9


def test_logistic_study_iris_equal_storage():
    from workbench.report.logistic_study import logistic_study

    study = logistic_study("iris", kept=(0.5, 0.75))
    assert study["shape"] == [3, 4] and study["before"]["test"] > 0.9
    for row in study["rows"]:
        for key in ("magnitude", "convex"):
            assert row[key]["stored"] <= row["budget"]
        if row["low_rank"] is not None:
            assert row["low_rank"]["stored"] <= row["budget"]
    assert study["rows"][0]["low_rank"] is None  # rank 1 needs 7 numbers > 6


def test_logistic_study_on_make_classification_keeps_the_budget_and_the_refit_helps():
    from workbench.report.logistic_study import logistic_study

    study = logistic_study("classification", kept=(0.25, 0.5))
    assert study["shape"] == [4, 20] and study["before"]["test"] > 0.8
    for row in study["rows"]:
        assert row["magnitude"]["stored"] <= row["budget"] and row["convex"]["stored"] <= row["budget"]
        # the refit fits the training logits on the kept support: never worse there than the cut alone
        assert row["convex"]["train"] >= row["magnitude"]["train"]
