"""Pruning kernels and sparse layers: masks, AGP schedule, sparse storage and its bytes."""
import pytest
import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.kernels import prune as pk
from workbench.layers.sparse import SparseConv2d, SparseLinear, choose_format
from workbench.measure import count_params, saved_bytes


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 1.0])
def test_mask_by_ratio_keeps_the_largest_magnitudes(ratio):
    w = torch.randn(40, 30)
    mask = pk.mask_by_ratio(w, ratio)
    k = pk.kept_count(w.numel(), ratio)
    assert int(mask.sum()) == k
    assert w.abs()[mask].min() >= w.abs()[~mask].max() if k < w.numel() else mask.all()


def test_mask_by_threshold_is_strictly_greater():
    w = torch.tensor([[0.1, -0.5, 0.2], [0.5, -0.05, 0.0]])
    assert pk.mask_by_threshold(w, 0.2).tolist() == [[False, True, False], [True, False, False]]
    assert pk.mask_by_threshold(w, 0.0).sum() == 5  # only the exact zero goes


def test_global_threshold_keeps_the_pooled_fraction():
    weights = {"a": torch.randn(50, 20), "b": torch.randn(30, 10) * 3}
    masks = pk.global_masks(weights, 0.25)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == pk.kept_count(1300, 0.25)
    # the larger-scale layer keeps a larger share: one cut across layers, not a share per layer
    assert masks["b"].float().mean() > masks["a"].float().mean()


def test_bad_masks_are_refused():
    w = torch.randn(5, 5)
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(WorkbenchError, match="must be in \\(0, 1\\]"):
            pk.mask_by_ratio(w, bad)
    with pytest.raises(WorkbenchError, match="prunes every weight of layer 'fc'"):
        pk.mask_by_threshold(w, float(w.abs().max()), "fc")


def test_agp_schedule_is_cubic_and_ends_at_target():
    s = [pk.agp_sparsity(t, 10, 0.9) for t in range(11)]
    assert s[0] == 0 and s[-1] == pytest.approx(0.9)
    steps = [b - a for a, b in zip(s, s[1:])]
    assert all(x > y for x, y in zip(steps, steps[1:]))  # fast early, slow late
    assert s[5] == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert pk.agp_ratios(0.1, 4)[-1] == pytest.approx(0.1)


def test_weakest_rows_by_l1_norm():
    w = torch.tensor([[1.0, 1.0], [0.1, 0.1], [3.0, 0.0], [0.0, 0.5]])
    assert pk.weakest_rows(w, 0.5) == [1, 3]


@pytest.mark.parametrize("fmt", ["bitmap", "csr"])
def test_sparse_linear_matches_the_masked_dense_layer(fmt):
    linear = nn.Linear(48, 32)
    mask = pk.mask_by_ratio(linear.weight, 0.3)
    layer = SparseLinear.from_linear(linear, mask, format=fmt)
    assert layer.format == fmt
    x = torch.randn(7, 48)
    expected = nn.functional.linear(x, linear.weight * mask, linear.bias)
    torch.testing.assert_close(layer(x), expected)
    assert layer(torch.randn(2, 3, 48)).shape == (2, 3, 32)
    assert torch.equal(layer.mask(), mask)
    assert count_params(layer) == int(mask.sum()) + 32


@pytest.mark.parametrize("fmt", ["bitmap", "csr"])
def test_sparse_conv_matches_the_masked_dense_conv(fmt):
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    mask = pk.mask_by_ratio(conv.weight, 0.4)
    layer = SparseConv2d.from_conv(conv, mask, format=fmt)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(layer(x), conv._conv_forward(x, conv.weight * mask, conv.bias))


def test_sparse_bytes_fall_with_sparsity():
    linear = nn.Linear(256, 256)
    dense = saved_bytes(nn.Sequential(linear))
    sizes = [saved_bytes(nn.Sequential(SparseLinear.from_linear(linear, pk.mask_by_ratio(linear.weight, r))))
             for r in (0.9, 0.5, 0.2, 0.05, 0.01)]
    assert sizes[0] < dense
    assert all(a > b for a, b in zip(sizes, sizes[1:]))
    assert sizes[1] < 0.6 * dense and sizes[2] < 0.3 * dense
    assert choose_format(256, 256, 300) == "csr" and choose_format(256, 256, 30000) == "bitmap"


def test_masked_round_trip_for_fine_tuning():
    linear = nn.Linear(20, 10)
    mask = pk.mask_by_ratio(linear.weight, 0.5)
    layer = SparseLinear.from_linear(linear, mask)
    dense, got_mask = layer.to_masked()
    assert torch.equal(got_mask, mask) and torch.equal(dense.weight[~mask], torch.zeros(int((~mask).sum())))
    with torch.no_grad():
        dense.weight.add_(mask * 1.0)  # "training" moves only kept weights
    again = SparseLinear.from_masked(dense, got_mask)
    torch.testing.assert_close(again.dense_weight(), dense.weight)


def test_sparse_state_dict_round_trip():
    conv = nn.Conv2d(3, 5, 3)
    layer = SparseConv2d.from_conv(conv, pk.mask_by_ratio(conv.weight, 0.2))
    other = SparseConv2d.from_conv(conv, pk.mask_by_ratio(conv.weight, 0.2))
    other.load_state_dict(layer.state_dict())
    assert all(not v.is_floating_point() or v.numel() < conv.weight.numel() for v in layer.state_dict().values())
    torch.testing.assert_close(other.dense_weight(), layer.dense_weight())
