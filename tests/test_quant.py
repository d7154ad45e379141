"""Quantization kernels and packed layers: error bounds, sklearn agreement, packing, real bytes."""
import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import quant as qk
from workbench.layers.quantized import Int8Linear, QuantConv2d, QuantLinear
from workbench.measure import count_params, saved_bytes


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 8, 1001])
def test_pack_unpack_round_trips_exactly(bits, count):
    codes = torch.randint(0, 2 ** bits, (count,), dtype=torch.uint8)
    packed = qk.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
    assert torch.equal(qk.unpack_codes(packed, bits, count), codes)


def test_pack_refuses_codes_out_of_range():
    with pytest.raises(WorkbenchError, match="codes must lie in \\[0, 7\\]"):
        qk.pack_codes(torch.tensor([8], dtype=torch.uint8), 3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_uniform_error_is_at_most_half_a_step(bits, per_channel, asymmetric):
    w = torch.randn(16, 3, 3, 3) + (0.7 if asymmetric else 0.0)
    codes, scale, zero = qk.quantize_uniform(w, bits, per_channel, asymmetric)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 2 ** bits
    error = (qk.dequantize_uniform(codes, scale, zero) - w).abs()
    assert torch.all(error <= scale / 2 * (1 + 1e-5))
    if per_channel:
        assert scale.shape == (16, 1, 1, 1)


def test_symmetric_grid_keeps_zero_and_the_extremes():
    w = torch.tensor([[-2.0, 0.0, 1.0, 2.0]])
    codes, scale, zero = qk.quantize_uniform(w, 3)
    w_hat = qk.dequantize_uniform(codes, scale, zero)
    assert w_hat[0, 1] == 0 and w_hat[0, 0] == -2 and w_hat[0, 3] == 2


def test_one_bit_is_sign_times_mean_magnitude():
    w = torch.tensor([[1.0, -3.0, 2.0, -2.0]])
    codes, scale, zero = qk.quantize_uniform(w, 1)
    assert qk.dequantize_uniform(codes, scale, zero).tolist() == [[2.0, -2.0, 2.0, -2.0]]


@pytest.mark.parametrize("bits", [2, 4])
def test_kmeans_reproduces_sklearn_centroids(bits):
    w = torch.randn(32, 24)
    codes, codebook = qk.kmeans_codebook(w, bits, seed=0)
    km = KMeans(n_clusters=2 ** bits, n_init=1, random_state=0).fit(w.double().numpy().reshape(-1, 1))
    np.testing.assert_allclose(codebook.numpy(), np.sort(km.cluster_centers_[:, 0]), rtol=1e-6)
    w_hat = qk.dequantize_codebook(codes, codebook)
    # every weight maps to its nearest centroid
    nearest = codebook[(w.reshape(-1, 1) - codebook).abs().argmin(dim=1)].reshape(w.shape)
    torch.testing.assert_close(w_hat, nearest)


def test_kmeans_of_a_large_layer_fits_a_sample_and_stays_as_good_as_a_full_fit():
    """Above KMEANS_FIT_SAMPLES values the centroids come from a sample plus Lloyd steps on all
    values: every weight still maps to its nearest centroid, and the squared error is within 1%
    of scikit-learn's fit on all values."""
    w = torch.randn(400, 384) * torch.rand(400, 1)    # 153,600 values, uneven row scales
    codes, codebook = qk.kmeans_codebook(w, 3, seed=0)
    w_hat = qk.dequantize_codebook(codes, codebook)
    nearest = codebook[(w.reshape(-1, 1) - codebook).abs().argmin(dim=1)].reshape(w.shape)
    torch.testing.assert_close(w_hat, nearest)
    km = KMeans(n_clusters=8, n_init=1, random_state=0).fit(w.double().numpy().reshape(-1, 1))
    assert float(((w_hat - w).double() ** 2).sum()) <= 1.01 * km.inertia_


def test_kmeans_per_channel_and_few_distinct_values():
    w = torch.randn(6, 50)
    codes, books = qk.kmeans_codebook(w, 2, per_channel=True)
    assert books.shape == (6, 4)
    assert qk.dequantize_codebook(codes, books).shape == w.shape
    few = torch.tensor([[0.5, -0.5, 0.5, 0.25]])
    codes, book = qk.kmeans_codebook(few, 3)
    assert torch.equal(qk.dequantize_codebook(codes, book), few)


@pytest.mark.parametrize("bits", [0, 9, 16, -1, 2.0, True])
def test_bad_bits_are_refused(bits):
    with pytest.raises(WorkbenchError, match="bits="):
        qk.check_bits(bits)
    assert qk.check_bits(32, allow_no_op=True) == 32


@pytest.mark.parametrize("scheme", ["uniform", "kmeans"])
def test_four_bit_linear_takes_under_a_fifth_of_fp32_bytes(scheme):
    linear = nn.Linear(256, 256)
    layer = QuantLinear.from_linear(linear, 4, scheme)
    assert saved_bytes(nn.Sequential(layer)) <= 0.2 * saved_bytes(nn.Sequential(linear))
    assert {k for k, v in layer.state_dict().items() if v.is_floating_point() and v.numel() > 256} == set()
    assert count_params(layer) == 256 * 256 + 256


@pytest.mark.parametrize("per_channel", [False, True])
def test_quant_conv_computes_with_the_dequantized_kernel(per_channel):
    conv = nn.Conv2d(3, 8, 3, padding=1)
    layer = QuantConv2d.from_conv(conv, 4, per_channel=per_channel)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(layer(x), conv._conv_forward(x, layer.dequantized_weight(), conv.bias))
    assert (layer.dequantized_weight() - conv.weight).abs().max() <= layer.scale.max() / 2 + 1e-6
    assert layer.grid().shape == ((8, 16) if per_channel else (16,))


def test_signed_codes_repack_the_same_grid():
    linear = nn.Linear(12, 5)
    layer = QuantLinear.from_linear(linear, 4, per_channel=True)
    signed = (layer.codes().to(torch.int16) - 8).to(torch.int8)
    again = QuantLinear.from_signed_codes(signed, layer.scale, layer.bias, linear, bits=4)
    torch.testing.assert_close(again.dequantized_weight(), layer.dequantized_weight())
    torch.testing.assert_close(layer.to_float().weight, layer.dequantized_weight())


def test_int8_linear_is_close_and_small():
    linear = nn.Linear(384, 512)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(32, 384)
    y = linear(x)
    assert ((layer(x) - y).norm() / y.norm()) < 0.02
    assert saved_bytes(nn.Sequential(layer)) < 0.3 * saved_bytes(nn.Sequential(linear))
    other = Int8Linear.from_linear(nn.Linear(384, 512))
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x), layer(x))
    with pytest.raises(UnsupportedLayerError):
        Int8Linear.from_linear(nn.Conv2d(3, 3, 1))
