"""Truncated-SVD kernels against the Eckart–Young theorem and their own definitions."""
import math

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.kernels import svd as k


@pytest.mark.parametrize("shape", [(40, 30), (30, 40), (64, 64), (256, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eckart_young_error_random(shape, dtype):
    w = torch.randn(*shape, dtype=dtype)
    s = k.singular_values(w)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for rank in (1, min(shape) // 3, min(shape) - 1):
        a, b = k.truncate(w, rank)
        assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1])
        error = torch.linalg.norm(w - a @ b).item()
        expected = math.sqrt(float((s[rank:].double() ** 2).sum()))
        assert error == pytest.approx(expected, rel=tol, abs=tol)
        assert k.truncation_error(s, rank) == pytest.approx(expected, rel=1e-6)


def test_eckart_young_on_real_layers(mlp_task):
    for name in ("fc1", "fc2", "fc3"):
        w = mlp_task.model.get_submodule(name).weight.detach()
        s = k.singular_values(w)
        rank = max(1, min(w.shape) // 4)
        a, b = k.truncate(w, rank)
        assert torch.linalg.norm(w - a @ b).item() == pytest.approx(k.truncation_error(s, rank), rel=1e-4)


def test_truncation_is_no_worse_than_other_rank_r_matrices():
    w = torch.randn(20, 15, dtype=torch.float64)
    a, b = k.truncate(w, 5)
    best = torch.linalg.norm(w - a @ b)
    for _ in range(20):
        other = torch.randn(20, 5, dtype=torch.float64) @ torch.randn(5, 15, dtype=torch.float64)
        assert torch.linalg.norm(w - other) >= best


def test_full_rank_reconstructs_exactly():
    w = torch.randn(12, 9, dtype=torch.float64)
    a, b = k.truncate(w, 9)
    torch.testing.assert_close(a @ b, w, rtol=1e-12, atol=1e-12)


def test_energy_and_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # sigma^2: 16, 4, 1, 1 -> total 22
    torch.testing.assert_close(k.energy(s), torch.tensor([16 / 22, 20 / 22, 21 / 22, 1.0]))
    assert k.rank_for_energy(s, 0.5) == 1
    assert k.rank_for_energy(s, 20 / 22) == 2
    assert k.rank_for_energy(s, 1.0) == 4
    assert k.effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert k.effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1.0)


@pytest.mark.parametrize("shape, ratio", [((256, 64), 0.5), ((256, 256), 0.3), ((10, 256), 0.9)])
def test_rank_for_ratio_keeps_at_most_the_ratio(shape, ratio):
    rank = k.rank_for_ratio(shape, ratio)
    m, n = shape
    assert k.factored_params(shape, rank) <= ratio * m * n
    assert k.factored_params(shape, rank + 1) > ratio * m * n or rank == min(shape)


def test_breakeven_rank_is_the_last_saving_rank():
    for shape in [(256, 64), (10, 256), (64, 64), (3, 3)]:
        r = k.breakeven_rank(shape)
        m, n = shape
        assert r * (m + n) < m * n
        assert (r + 1) * (m + n) >= m * n


@pytest.mark.parametrize("rank", [0, -1, 11, 2.5, True])
def test_bad_ranks_name_the_value_and_the_rule(rank):
    with pytest.raises(WorkbenchError, match=rf"rank={rank!r}|rank={rank}"):
        k.check_rank(rank, (10, 20), "fc")


@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan")])
def test_fractions_outside_zero_one_are_refused(value):
    with pytest.raises(WorkbenchError, match=r"must be in \(0, 1\]"):
        k.rank_for_ratio((10, 10), value)
    with pytest.raises(WorkbenchError, match=r"must be in \(0, 1\]"):
        k.rank_for_energy(torch.ones(3), value)
