"""LowRankLinear / LowRankConv2d: real factors, exact at full rank, exact parameter counts."""
import pytest
import torch
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.layers import LowRankConv2d, LowRankLinear
from workbench.measure import count_params


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(32, 16), (16, 32)])
def test_linear_full_rank_reproduces_outputs(shape, bias):
    linear = nn.Linear(shape[1], shape[0], bias=bias).double()
    layer = LowRankLinear.from_linear(linear, min(shape))
    x = torch.randn(5, shape[1], dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_linear_parameter_count_is_r_times_m_plus_n_plus_bias(rank):
    linear = nn.Linear(30, 20)
    layer = LowRankLinear.from_linear(linear, rank)
    assert count_params(layer) == rank * (20 + 30) + 20
    assert layer.first.weight.shape == (rank, 30) and layer.second.weight.shape == (20, rank)


def test_linear_factor_product_is_the_truncation():
    linear = nn.Linear(40, 25)
    layer = LowRankLinear.from_linear(linear, 6)
    w = linear.weight.detach().double()
    s = torch.linalg.svdvals(w)
    err = torch.linalg.norm(w - layer.dense_weight_preview().double())
    assert err.item() == pytest.approx(float((s[6:] ** 2).sum().sqrt()), rel=1e-4)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_conv_full_rank_reproduces_outputs(stride, padding, dilation):
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation).double()
    layer = LowRankConv2d.from_conv(conv, 6)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-10, atol=1e-10)


def test_conv_parameter_count():
    conv = nn.Conv2d(8, 16, 3)
    layer = LowRankConv2d.from_conv(conv, 5)
    assert count_params(layer) == 5 * (8 * 9 + 16) + 16


def test_original_layers_are_untouched():
    linear = nn.Linear(10, 10)
    before = linear.weight.detach().clone()
    LowRankLinear.from_linear(linear, 3)
    assert torch.equal(linear.weight, before)


def test_grouped_conv_is_refused_with_reason():
    with pytest.raises(UnsupportedLayerError, match="groups=2"):
        LowRankConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 2)


def test_rank_above_limit_is_refused():
    with pytest.raises(WorkbenchError, match=r"rank=11 is above min\(out, in\)=10"):
        LowRankLinear.from_linear(nn.Linear(10, 20), 11)
