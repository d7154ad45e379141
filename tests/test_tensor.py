"""Tucker-2, CP and spatial SVD of conv kernels; their layer sequences; BatchNorm folding."""
import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import tensorly as tl
import torch
from tensorly.decomposition import parafac, partial_tucker
from torch import nn

import workbench as wb
from conftest import state_bytes
from workbench.cli import main
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.kernels import tensor as tk
from workbench.layers.tensor import CPConv2d, SpatialSVDConv2d, TuckerConv2d
from workbench.measure import count_params
from workbench.methods.tensor import bn_fold_analysis
from workbench.registry import get_recipe

CONVS = [  # (in, out, kernel, stride, padding, dilation, bias, padding_mode)
    (6, 8, 3, 1, 1, 1, True, "zeros"),
    (5, 7, (3, 5), (2, 1), (1, 2), 1, False, "zeros"),
    (4, 6, 3, 1, 2, 2, True, "zeros"),
    (4, 6, 3, 1, "same", 1, True, "zeros"),
    (3, 5, 3, 2, 1, 1, True, "reflect"),
]


def make_conv(spec):
    cin, cout, k, stride, padding, dilation, bias, mode = spec
    torch.manual_seed(1)
    return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=bias,
                     padding_mode=mode).double()


def conv_with(conv, kernel, x):
    """``conv`` run with another kernel (the oracle: same stride/padding/dilation/padding mode)."""
    ref = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None,
                    padding_mode=conv.padding_mode).double()
    with torch.no_grad():
        ref.weight.copy_(kernel)
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    return ref(x)


def test_tucker2_matches_tensorly_reconstruction():
    w = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    ours = tk.tucker2(w, (4, 3))
    (core, factors), _ = partial_tucker(w.numpy(), rank=[4, 3], modes=[0, 1], init="svd", n_iter_max=100,
                                        tol=1e-8)
    theirs = tl.tenalg.multi_mode_dot(core, factors, modes=[0, 1])
    np.testing.assert_allclose(ours.to_tensor().numpy(), theirs, atol=1e-10)
    # and tensorly's own Tucker reconstruction of our factors (identity on the spatial modes)
    full = tl.tucker_to_tensor((ours.core.numpy(), [ours.u_out.numpy(), ours.u_in.numpy(), np.eye(3), np.eye(3)]))
    np.testing.assert_allclose(ours.to_tensor().numpy(), full, atol=1e-12)


def test_cp_matches_tensorly_reconstruction():
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    ours = tk.cp(w, 7)
    theirs = tl.cp_to_tensor(parafac(w.numpy(), rank=7, init="svd", n_iter_max=200, tol=1e-10, random_state=0))
    np.testing.assert_allclose(ours.to_tensor().numpy(), theirs, atol=1e-8)


def test_spatial_svd_is_eckart_young_of_the_rearranged_kernel():
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    matrix = w.permute(1, 2, 0, 3).reshape(12, 18)
    s = torch.linalg.svdvals(matrix)
    for rank in (2, 5):
        err = (tk.spatial_svd(w, rank).to_tensor() - w).norm()
        assert float(err) == pytest.approx(float(s[rank:].pow(2).sum().sqrt()), rel=1e-9)
    assert torch.allclose(tk.spatial_svd(w, 12).to_tensor(), w, atol=1e-12)


@pytest.mark.parametrize("spec", CONVS)
def test_layer_sequences_equal_conv_with_reconstructed_kernel(spec):
    conv = make_conv(spec)
    x = torch.randn(2, conv.in_channels, 11, 10, dtype=torch.float64)
    o, i = conv.out_channels, conv.in_channels
    cases = [
        (TuckerConv2d.from_conv(conv, (o - 2, i - 1)), tk.tucker2(conv.weight, (o - 2, i - 1))),
        (CPConv2d.from_conv(conv, 5), tk.cp(conv.weight, 5)),
        (SpatialSVDConv2d.from_conv(conv, 2), tk.spatial_svd(conv.weight, 2)),
    ]
    for layer, factors in cases:
        y = layer(x)
        assert y.shape == conv(x).shape
        assert torch.allclose(y, conv_with(conv, factors.to_tensor(), x), atol=1e-9), type(layer).__name__


@pytest.mark.parametrize("spec", CONVS)
def test_full_rank_tucker_and_spatial_reproduce_the_conv(spec):
    conv = make_conv(spec)
    x = torch.randn(2, conv.in_channels, 9, 12, dtype=torch.float64)
    full = TuckerConv2d.from_conv(conv, (conv.out_channels, conv.in_channels))
    assert torch.allclose(full(x), conv(x), atol=1e-9)
    kh, kw = conv.kernel_size
    spatial = SpatialSVDConv2d.from_conv(conv, min(conv.in_channels * kh, conv.out_channels * kw))
    assert torch.allclose(spatial(x), conv(x), atol=1e-9)


def test_parameter_counts_are_exact():
    conv = nn.Conv2d(12, 24, (3, 5), padding=1)
    shape = (64, 32, 3, 3)
    assert count_params(TuckerConv2d.from_conv(conv, (20, 10))) == 12 * 10 + 20 * 10 * 15 + 20 * 24 + 24
    assert count_params(CPConv2d.from_conv(conv, 6)) == 6 * (24 + 12 + 3 + 5) + 24
    assert count_params(SpatialSVDConv2d.from_conv(conv, 7)) == 7 * (12 * 3 + 24 * 5) + 24
    assert tk.tucker_params((24, 12, 3, 5), (20, 10)) + 24 == count_params(TuckerConv2d.from_conv(conv, (20, 10)))
    r_out, r_in = tk.tucker_ranks_for_ratio(shape, 0.5)
    assert tk.tucker_params(shape, (r_out, r_in)) <= 0.5 * 64 * 32 * 9
    assert tk.cp_params(shape, tk.cp_rank_for_ratio(shape, 0.5)) <= 0.5 * 64 * 32 * 9


def test_bad_ranks_and_grouped_convs_are_refused():
    conv = nn.Conv2d(8, 16, 3)
    with pytest.raises(WorkbenchError, match=r"rank_in=9 is above the input-channel mode size=8"):
        TuckerConv2d.from_conv(conv, (4, 9), name="c")
    with pytest.raises(WorkbenchError, match=r"rank_out=17 is above the output-channel mode size=16"):
        TuckerConv2d.from_conv(conv, (17, 4))
    with pytest.raises(WorkbenchError, match=r"rank=25 is above min\(in\*kh, out\*kw\)=24"):
        SpatialSVDConv2d.from_conv(conv, 25)
    with pytest.raises(WorkbenchError, match=r"rank=0 .* at least 1"):
        CPConv2d.from_conv(conv, 0)
    grouped = nn.Conv2d(8, 16, 3, groups=2)
    with pytest.raises(UnsupportedLayerError, match=r"'g' is a grouped conv \(groups=2\): left dense because"):
        TuckerConv2d.from_conv(grouped, (4, 4), name="g")
    depthwise = nn.Conv2d(8, 8, 3, groups=8)
    with pytest.raises(UnsupportedLayerError, match=r"depthwise conv .* left dense because"):
        CPConv2d.from_conv(depthwise, 3, name="dw")


def test_vbmf_finds_the_rank_of_a_noisy_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 60, generator=g, dtype=torch.float64)
    noisy = low + 0.05 * torch.randn(40, 60, generator=g, dtype=torch.float64)
    assert tk.vbmf_rank(noisy) == 5
    assert tk.vbmf_rank(noisy.T) == 5


def test_recipes_on_digits_cnn_keep_the_user_model(cnn_task):
    model = cnn_task.model
    before = state_bytes(model)
    dense = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for method, options in (("tucker", {"ratio": 0.5}), ("spatial-svd", {"ratio": 0.5}),
                            ("cp", {"ranks": {"conv2": 16}})):  # CP at ratio 0.5 (rank 90) is a benchmark
        plan = get_recipe(method)(model, **options)
        assert set(plan.layers) <= set(dense) and "conv2" in plan.layers
        compressed = wb.apply(model, plan)
        for name in plan.layers:
            sub = compressed.get_submodule(name)
            assert count_params(sub) - 64 * (name == "conv2") - 32 * (name == "conv1") <= 0.5 * dense[name]
        assert cnn_task.evaluate(compressed) > 0.3
    assert state_bytes(model) == before
    with pytest.raises(WorkbenchError, match="above the output-channel mode size=64"):
        get_recipe("tucker")(model, ranks={"conv2": (65, 3)})
    with pytest.raises(UnsupportedLayerError, match="cannot compress layer .fc1. of type Linear; it handles: Conv2d"):
        wb.apply(model, wb.Plan({"fc1": wb.LayerPlan("tucker", {"rank_out": 3, "rank_in": 3})}))
    vbmf = get_recipe("tucker")(model, estimate="vbmf")
    assert all(1 <= c["rank_out"] <= 64 for c in vbmf.layers.values())


@pytest.mark.slow
def test_cli_tucker_json(capsys, cnn_task):
    assert main(["compress", "digits-cnn", "--method", "tucker", "--ratio", "0.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["plan"]["layers"]["conv2"]["method"] == "tucker"
    assert result["after"]["params"] < result["before"]["params"]


def _randomise_bn_statistics(model):
    """Random statistics and affine terms for every BN that tracks statistics (mean in [-1, 1],
    variance in [0.5, 2], weight in [0.5, 1.5], bias in [-0.5, 0.5]), in module order; eval mode."""
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.running_mean is not None:
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _fold_checked(build, input_shape):
    """Build ``build()`` from seed 0 with random BN statistics, fold its BNs with the ``fold_bn``
    recipe and check that the folded model computes the original's outputs (to 1e-5) on a random
    input of ``input_shape``, and that the input model is unchanged. Returns ``(folded, pairs, left)``,
    the last two from `bn_fold_analysis` (folded ``(conv, bn)`` pairs; ``{bn: why it stays}``)."""
    torch.manual_seed(0)
    model = _randomise_bn_statistics(build())
    before = state_bytes(model)
    pairs, left = bn_fold_analysis(model)
    folded = wb.apply(model, get_recipe("fold_bn")(model))
    x = torch.randn(*input_shape)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)
    assert state_bytes(model) == before
    return folded, pairs, left


def _conv_bn_sequential():
    """conv -> BN2d, grouped conv (no bias) -> BN2d, Linear -> BN1d; input (N, 3, 8, 8)."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, padding=1)), ("bn1", nn.BatchNorm2d(8)), ("act", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 8, 3, groups=2, bias=False)), ("bn2", nn.BatchNorm2d(8)),
        ("flat", nn.Flatten()), ("fc", nn.Linear(8 * 6 * 6, 5)), ("bn3", nn.BatchNorm1d(5))]))


def test_fold_bn_is_exact_and_removes_the_batchnorms():
    folded, pairs, left = _fold_checked(_conv_bn_sequential, (4, 3, 8, 8))
    assert pairs == [("conv1", "bn1"), ("conv2", "bn2"), ("fc", "bn3")] and left == {}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    with pytest.raises(UnsupportedLayerError, match="nothing to fold"):
        get_recipe("fold_bn")(nn.Sequential(nn.Linear(3, 3)))


def test_tucker_explorer_headless_shows_errors_as_messages(cnn_task):
    from workbench.widgets.conv_rnn import TuckerExplorer

    explorer = TuckerExplorer(cnn_task, "conv2", rank_out=8, rank_in=4, latency_repeats=1, synchronous=True)
    assert explorer.after["params"] < explorer.before["params"]
    assert explorer.plan.layers["conv2"].params == {"rank_out": 8, "rank_in": 4}
    explorer.compute(explorer.settings())
    with pytest.raises(WorkbenchError):
        explorer.compute({**explorer.settings(), "rank_out": 65})
    explorer.rank_in.value = 32
    assert explorer.error.value == "" and "<table>" in explorer.readout.value


def test_tucker_explorer_break_even_agrees_with_the_weight_count(cnn_task):
    """conv2 is (64, 32, 3, 3): at rank_in 32 the factors 32*32 + 9*32*r + 64 r reach 18,432 at r = 49.2, so
    break-even is 49; the size line and the measured parameter counts agree on which side of dense a rank is."""
    from workbench.kernels.tensor import tucker_params
    from workbench.widgets.conv_rnn import TuckerExplorer

    explorer = TuckerExplorer(cnn_task, "conv2", rank_out=49, rank_in=32, latency_repeats=1, synchronous=True)
    dense = 64 * 32 * 9
    assert explorer.break_even_rank_out(32) == 49
    assert tucker_params((64, 32, 3, 3), (49, 32)) < dense <= tucker_params((64, 32, 3, 3), (50, 32))
    assert "smaller than dense" in explorer.size_note.value and explorer.after["params"] < explorer.before["params"]
    explorer.rank_out.value = 50
    assert "larger than dense" in explorer.size_note.value and explorer.after["params"] > explorer.before["params"]
    explorer.rank_in.value = 4
    assert "every rank out (up to 64) stays smaller" in explorer.size_note.value


def test_fold_bn_folds_the_batchnorms_inside_residual_blocks():
    """digits-resnet: the stem's BN, both BNs of each block (called from the block's forward) and the
    shortcut's BN all follow a lone conv output; every one folds, the outputs stay."""
    task = wb.load("digits-resnet")
    model, x = copy.deepcopy(task.model).train(), task.eval_inputs[:64]
    before = state_bytes(model)
    pairs, left = bn_fold_analysis(model)
    assert pairs == [("stem", "bn"), ("block1.conv1", "block1.bn1"), ("block1.conv2", "block1.bn2"),
                     ("block2.conv1", "block2.bn1"), ("block2.conv2", "block2.bn2"),
                     ("block2.shortcut.conv", "block2.shortcut.bn")] and left == {}
    folded = wb.apply(model, get_recipe("fold_bn")(model)).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert all(isinstance(folded.get_submodule(bn), nn.Identity) for _, bn in pairs)
    assert model.training and state_bytes(model) == before  # the input model is untouched, still training
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=0)


class _Unfoldable(nn.Module):
    """One BN of each kind that must stay, beside one that folds (``c2 -> b_ok``)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b_after_add = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b_ok = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c3, self.b_shared_input = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c4, self.b_twice = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.c5, self.b_no_stats = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.b_unused = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.b_after_add(self.c1(x) + 1)            # input is an add, not a conv output
        y = self.b_ok(self.c2(y))
        z = self.c3(y)
        y = self.b_shared_input(z) + z                  # the conv output is also used by the add
        y = self.b_twice(self.c4(y)) + self.b_twice(y)  # one BN module called twice
        return self.b_no_stats(self.c5(y))


def test_fold_bn_leaves_the_batchnorms_it_cannot_fold_and_says_why():
    folded, pairs, left = _fold_checked(_Unfoldable, (2, 3, 5, 5))
    assert pairs == [("c2", "b_ok")]
    assert "the result of add()" in left["b_after_add"]
    assert "'c3' is also used elsewhere" in left["b_shared_input"]
    assert left["b_twice"] == "called 2 times in forward"
    assert "track_running_stats=False" in left["b_no_stats"]
    assert left["b_unused"] == "never called in forward"
    assert isinstance(folded.b_ok, nn.Identity) and all(
        isinstance(getattr(folded, name), nn.BatchNorm2d) for name in left)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.seq(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = -y
        return self.bn(self.conv(y))


def test_fold_bn_without_a_graph_folds_only_nn_sequential_neighbours():
    _, pairs, left = _fold_checked(_Untraceable, (2, 3, 6, 6))
    assert pairs == [("seq.0", "seq.1")] and list(left) == ["bn"] and "could not trace" in left["bn"]
    with pytest.raises(UnsupportedLayerError, match="'b': its input is the output of ReLU"):
        get_recipe("fold_bn")(nn.Sequential(OrderedDict([("a", nn.ReLU()), ("b", nn.BatchNorm2d(3))])))
