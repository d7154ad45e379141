"""Measures: parameter counts, bytes really written, FLOPs against hand counts."""
import torch
from torch import nn

from workbench.measure import count_flops, count_params, latency_ms, latency_samples, measure, saved_bytes


def test_flops_of_an_mlp_match_the_hand_count():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    assert count_flops(model, torch.randn(1, 64)) == 2 * (64 * 256 + 256 * 10)


def test_flops_of_a_conv_match_the_hand_count():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_flops(conv, torch.randn(1, 3, 8, 8)) == 2 * 8 * 8 * 8 * 3 * 9


def test_saved_bytes_track_the_stored_floats():
    small, large = nn.Linear(10, 10), nn.Linear(100, 100)
    extra_floats = (100 * 100 + 100) - (10 * 10 + 10)
    difference = saved_bytes(large) - saved_bytes(small)
    assert extra_floats * 4 <= difference < extra_floats * 4 + 128  # zip alignment padding only


def test_measure_reports_every_field(mlp_task):
    result = measure(mlp_task.model, mlp_task)
    assert result["params"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert result["bytes"] > result["params"] * 4
    assert result["flops"] == 2 * (64 * 256 + 256 * 256 + 256 * 10)
    assert result["latency_ms"] > 0 and result["threads"] >= 1
    assert result["metric"] == mlp_task.evaluate()


def test_count_params_honours_stored_weights():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("codes", torch.zeros(50, dtype=torch.uint8))
            self.scale = nn.Parameter(torch.ones(1))

        def stored_weights(self):
            return 100

    model = nn.Sequential(nn.Linear(2, 2), Packed())
    assert count_params(model) == 6 + 100
    assert latency_ms(model[0], torch.randn(1, 2), repeats=3, warmup=1) > 0


def test_int8_and_fused_lstm_kernels_are_counted(mlp_task):
    from workbench.registry import get_recipe
    import workbench as wb

    int8 = wb.apply(mlp_task.model, get_recipe("int8")(mlp_task.model))
    assert count_flops(int8, mlp_task.example_input) == count_flops(mlp_task.model, mlp_task.example_input)
    lstm = nn.LSTM(8, 16, batch_first=True)
    x = torch.randn(1, 5, 8)
    assert count_flops(lstm, x) == 2 * 5 * (4 * 16 * 8 + 4 * 16 * 16)


def test_flops_of_a_csr_pruned_linear_count_only_the_kept_weights():
    from workbench.layers.sparse import SparseLinear
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    mask = torch.rand(48, 64) < 0.04
    sparse = SparseLinear.from_linear(linear, mask, "csr")
    assert sparse.format == "csr"
    x = torch.randn(5, 64)
    assert count_flops(sparse, x) == 2 * int(mask.sum()) * 5
    assert count_flops(SparseLinear.from_linear(linear, mask, "bitmap"), x) == 2 * 5 * 64 * 48  # computes dense


def test_latency_samples_time_only_the_repeats_after_the_warmup_and_restore_the_mode():
    calls = []

    class Counting(torch.nn.Linear):
        def forward(self, x):
            calls.append(self.training)
            return super().forward(x)

    model = Counting(2, 2).train()
    samples = latency_samples(model, torch.randn(1, 2), repeats=7, warmup=3)
    assert len(samples) == 7 and all(t > 0 for t in samples)
    assert calls == [False] * 10  # 3 warm-up + 7 timed runs, all in eval mode
    assert model.training  # the caller's mode is back
