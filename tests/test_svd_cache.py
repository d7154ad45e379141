"""The one SVD cache: keyed by content (a deep copy hits), bounded in bytes (LRU), exact."""
import copy

import pytest
import torch

import workbench as wb
from workbench import svd_cache
from workbench.kernels import svd as svd_kernels
from workbench.spectra import layer_svd


@pytest.fixture
def fresh_cache():
    svd_cache.clear()
    before = svd_cache.stats()["max_bytes"]
    yield
    svd_cache.set_max_bytes(before)
    svd_cache.clear()


def test_apply_on_a_deep_copy_reuses_the_spectra_svd(mlp_task, fresh_cache):
    layer_svd(mlp_task.model.fc2)                       # what the spectra view computes
    misses = svd_cache.stats()["misses"]
    wb.apply(copy.deepcopy(mlp_task.model), wb.Plan({"fc2": wb.LayerPlan("svd", {"rank": 8})}))
    stats = svd_cache.stats()
    assert stats["misses"] == misses and stats["hits"] >= 1


def test_cached_factors_equal_a_fresh_svd(fresh_cache):
    torch.manual_seed(0)
    w = torch.randn(40, 24)
    cached = svd_cache.cached_svd(w)
    fresh = svd_kernels.svd(w)
    assert torch.equal(cached.s, fresh.s) and torch.equal(cached.u, fresh.u)
    assert svd_cache.cached_svd(w.clone()) is cached   # same content, other tensor: a hit


def test_a_changed_weight_misses(fresh_cache):
    w = torch.randn(16, 8)
    first = svd_cache.cached_svd(w)
    w[0, 0] += 1.0
    second = svd_cache.cached_svd(w)
    assert second is not first and not torch.equal(first.s, second.s)


def test_the_cache_is_bounded_and_evicts_least_recently_used(fresh_cache):
    one = 4 * (32 * 32 + 32 + 32 * 32)                  # u, s, vh of a 32x32 float32 matrix
    svd_cache.set_max_bytes(2 * one)
    misses = svd_cache.stats()["misses"]
    a, b, c = (torch.randn(32, 32) for _ in range(3))
    svd_cache.cached_svd(a)
    svd_cache.cached_svd(b)
    svd_cache.cached_svd(a)                              # a is now the most recent
    svd_cache.cached_svd(c)                              # evicts b
    stats = svd_cache.stats()
    assert stats["entries"] == 2 and stats["bytes"] <= 2 * one and stats["misses"] == misses + 3
    hits = stats["hits"]
    svd_cache.cached_svd(a)
    assert svd_cache.stats()["hits"] == hits + 1
    svd_cache.cached_svd(b)
    assert svd_cache.stats()["misses"] == misses + 4   # b was evicted


def test_a_negative_bound_is_refused():
    with pytest.raises(ValueError, match="max_bytes=-1"):
        svd_cache.set_max_bytes(-1)


def test_a_parameter_changed_through_data_misses(fresh_cache):
    """``weight.data.copy_`` leaves ``_version`` as it was: parameters are hashed every time."""
    layer = torch.nn.Linear(6, 5)
    first = layer_svd(layer)
    layer.weight.data.copy_(torch.randn(5, 6))
    assert not torch.equal(layer_svd(layer).s, first.s)
