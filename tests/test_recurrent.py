"""Low-rank GRU/LSTM: full-rank equality with nn.GRU/nn.LSTM, exact counts, recipes, errors, FLOPs."""
import pytest
import torch
from torch import nn

import workbench as wb
from conftest import state_bytes
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.layers.recurrent import GATES, LowRankRNN, factored_weights, gate_matrices, recurrent_layers
from workbench.measure import count_flops, count_params
from workbench.methods.recurrent import recurrent_weights
from workbench.registry import get_recipe


def make_rnn(cls, batch_first=True, bias=True):
    torch.manual_seed(3)
    return cls(6, 10, batch_first=batch_first, bias=bias)


def full_ranks(kind, per_gate, inp=6, hidden=10):
    g = len(GATES[kind])
    return min(hidden if per_gate else g * hidden, inp), min(hidden if per_gate else g * hidden, hidden)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("per_gate", [True, False])
def test_full_rank_equals_torch(cls, batch_first, per_gate):
    rnn = make_rnn(cls, batch_first)
    r_ih, r_hh = full_ranks(cls.__name__, per_gate)
    low = LowRankRNN.from_rnn(rnn, r_ih, r_hh, per_gate=per_gate)
    x = torch.randn(3, 7, 6) if batch_first else torch.randn(7, 3, 6)
    out, state = rnn(x)
    low_out, low_state = low(x)
    assert torch.allclose(low_out, out, atol=1e-5)
    for a, b in zip(state if isinstance(state, tuple) else (state,),
                    low_state if isinstance(low_state, tuple) else (low_state,)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_initial_state_and_unbatched_input(cls):
    rnn = make_rnn(cls)
    low = LowRankRNN.from_rnn(rnn, None, None)
    x = torch.randn(2, 5, 6)
    h0 = torch.randn(1, 2, 10)
    hx = (h0, torch.randn(1, 2, 10)) if cls is nn.LSTM else h0
    assert torch.allclose(low(x, hx)[0], rnn(x, hx)[0], atol=1e-5)
    assert torch.allclose(low(x[0])[0], rnn(x[0])[0], atol=1e-5)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("per_gate", [True, False])
def test_rank_r_runs_the_truncated_weights_and_counts_exactly(cls, per_gate):
    rnn = make_rnn(cls)
    kind = cls.__name__
    low = LowRankRNN.from_rnn(rnn, 2, 3, per_gate=per_gate)
    g = len(GATES[kind])
    expected = (factored_weights(kind, "ih", 6, 10, 2, per_gate) + factored_weights(kind, "hh", 6, 10, 3, per_gate)
                + 2 * g * 10)
    assert count_params(low) == expected
    assert expected == (g * 2 * (10 + 6) + g * 3 * 20 if per_gate else 2 * (g * 10 + 6) + 3 * (g * 10 + 10)) + 2 * g * 10
    # oracle: nn.RNN of the same kind holding the truncated (dense) products
    ref = make_rnn(cls)
    with torch.no_grad():
        ref.weight_ih_l0.copy_(low.dense_weight_preview("ih"))
        ref.weight_hh_l0.copy_(low.dense_weight_preview("hh"))
    x = torch.randn(4, 6, 6)
    assert torch.allclose(low(x)[0], ref(x)[0], atol=1e-5)
    # per gate, each gate block is the best rank-2 approximation (Eckart–Young)
    if per_gate:
        for gi, w in enumerate(gate_matrices(rnn)["ih"].values()):
            s = torch.linalg.svdvals(w.double())
            err = (low.dense_weight_preview("ih")[gi * 10:(gi + 1) * 10] - w).double().norm()
            assert float(err) == pytest.approx(float(s[2:].pow(2).sum().sqrt()), rel=1e-4)


def test_unsupported_rnns_are_refused_with_the_setting_named():
    with pytest.raises(UnsupportedLayerError, match=r"'r' is a GRU with bidirectional=True"):
        LowRankRNN.from_rnn(nn.GRU(4, 8, bidirectional=True), 2, 2, name="r")
    with pytest.raises(UnsupportedLayerError, match=r"num_layers=2 \(only single-layer"):
        LowRankRNN.from_rnn(nn.LSTM(4, 8, num_layers=2), 2, 2)
    with pytest.raises(UnsupportedLayerError, match=r"proj_size=3"):
        LowRankRNN.from_rnn(nn.LSTM(4, 8, proj_size=3), 2, 2)
    with pytest.raises(WorkbenchError, match=r"rank=5 is above min\(out, in\)=4"):
        LowRankRNN.from_rnn(nn.GRU(4, 8), 5, 2)
    with pytest.raises(WorkbenchError, match=r"rank_hh=9 is above the largest rank of weight_hh"):
        get_recipe("svd_rnn")(nn.Sequential(nn.GRU(4, 8)), ranks={"0": (2, 9)})


def test_svd_recipe_factorizes_gru_at_half_the_recurrent_weights(gru_task):
    model = gru_task.model
    before = state_bytes(model)
    plan = get_recipe("svd")(model, ratio=0.5)
    assert plan.layers["rnn"].method == "svd_rnn"
    compressed = wb.apply(model, plan)
    low = compressed.rnn
    assert isinstance(low, LowRankRNN)
    kept = (factored_weights("GRU", "ih", 8, 64, low.rank_ih, low.per_gate)
            + factored_weights("GRU", "hh", 8, 64, low.rank_hh, low.per_gate))
    assert kept <= 0.5 * recurrent_weights(model.rnn)
    assert count_params(low) == kept + 2 * 3 * 64
    assert gru_task.evaluate(compressed) > 0.3
    assert state_bytes(model) == before
    # `layers` naming only the RNN leaves the head dense
    assert set(get_recipe("svd")(model, ratio=0.5, layers=["rnn"]).layers) == {"rnn"}


def test_recurrent_layers_are_listed_and_multilayer_ones_stay_dense():
    model = nn.Sequential(nn.GRU(4, 8, num_layers=2), nn.LSTM(8, 8))
    assert [n for n, _ in recurrent_layers(model)] == ["0", "1"]
    plan = get_recipe("svd_rnn")(model, ratio=0.5)
    assert set(plan.layers) == {"1"}
    with pytest.raises(UnsupportedLayerError, match="num_layers=2"):
        get_recipe("svd_rnn")(model, ratio=0.5, layers=["0"])


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_flops_are_counted_for_dense_and_low_rank(cls):
    rnn = make_rnn(cls)
    g = len(GATES[cls.__name__])
    x = torch.randn(1, 8, 6)
    dense = 2 * 8 * g * 10 * (6 + 10)
    assert count_flops(rnn, x) == dense
    assert count_flops(LowRankRNN.from_rnn(rnn, None, None), x) == dense
    low = LowRankRNN.from_rnn(rnn, 2, 3, per_gate=False)
    assert count_flops(low, x) == 2 * 8 * (2 * (6 + g * 10) + 3 * (10 + g * 10))


def test_gate_explorer_headless(gru_task):
    from workbench.widgets.conv_rnn import GateRankExplorer

    explorer = GateRankExplorer(gru_task, "rnn", rank_ih=3, rank_hh=16, latency_repeats=1, synchronous=True)
    assert explorer.after["params"] < explorer.before["params"] and explorer.error.value == ""
    assert list(explorer.markers["hh"].get_xdata()) == [16, 16]
    explorer.rank_hh.value = explorer.rank_hh.max  # right end, as in the dashboard: dense hidden matrix
    assert explorer.plan.layers["rnn"]["rank_hh"] is None and not explorer.markers["hh"].get_visible()
    assert explorer.rank_hh.max == 64 and explorer.rank_hh.min == 1
    explorer.per_gate.value = False
    explorer.rank_hh.value = 63
    assert explorer.error.value == "" and "compressed" in explorer.readout.value


def test_gate_explorer_marks_the_break_even_rank(gru_task):
    """Break-even = the largest rank whose factors hold fewer weights than dense (per gate: 3 r (H + cols)
    against 3 H cols); above it the size line says "larger than dense" and the measured params agree."""
    from workbench.widgets.conv_rnn import GateRankExplorer

    explorer = GateRankExplorer(gru_task, "rnn", rank_ih=3, rank_hh=16, latency_repeats=1, synchronous=True)
    assert explorer.break_even(True) == {"ih": 7, "hh": 31}  # 3*7*72 < 3*64*8 <= 3*8*72; 3*31*128 < 3*64*64
    assert explorer.break_even(False) == {"ih": 7, "hh": 47}  # r (192 + cols) < 192 cols
    assert list(explorer.break_even_lines["hh"].get_xdata()) == [31, 31]
    explorer.rank_hh.value = 31
    assert "larger than dense" not in explorer.size_note.value
    explorer.rank_hh.value = 32
    assert "larger than dense" in explorer.size_note.value
    explorer.rank_ih.value, explorer.rank_hh.value = 8, 40  # ih dense, hh above break-even
    assert explorer.after["params"] > explorer.before["params"]
    explorer.per_gate.value = False  # stacked: 40 is below its break-even 47
    assert list(explorer.break_even_lines["hh"].get_xdata()) == [47, 47]
    assert "larger than dense" not in explorer.size_note.value
    assert explorer.after["params"] < explorer.before["params"]


@pytest.mark.slow
def test_cli_rows_list_the_recurrent_layer(capsys, gru_task):
    import json

    from workbench.cli import main

    assert main(["compress", "digits-gru", "--method", "svd", "--ratio", "0.5", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["layers"]}
    assert rows["rnn"]["method"] == "svd_rnn" and rows["rnn"]["shape"] == [192, 72]
    assert rows["rnn"]["params_after"] < rows["rnn"]["params_before"]


def test_low_rank_rnn_saves_and_loads_back(tmp_path, gru_task):
    plan = get_recipe("svd_rnn")(gru_task.model, ratio=0.25, per_gate=False)
    model = wb.apply(gru_task.model, plan)
    path = wb.save_compressed(tmp_path / "gru.safetensors", model, plan, "digits-gru")
    loaded = wb.load_compressed(path).model
    x = gru_task.eval_inputs[:16]
    assert torch.equal(loaded(x), model(x))
