"""transformers' Conv1D (GPT-2's layers) through its adapter: every Linear method compresses it.

GPT-2 is built from a tiny config with random weights (nothing downloaded). The task model is a
wrapper returning ``.logits`` (the raw model returns a ``ModelOutput``).
"""
import pytest
import torch
from torch import nn

import workbench as wb
from conftest import state_bytes
from workbench.adapters import canonical, conv1d_as_linear, is_transformers_conv1d, matrix_kind
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.hooks import collect_layer_inputs
from workbench.inventory import inventory, matrix_layers, set_submodule, weight_matrix
from workbench.layers.lowrank import LowRankLinear
from workbench.layers.quantized import Int8Linear, QuantLinear
from workbench.layers.sparse import SparseLinear
from workbench.measure import count_flops, count_params
from workbench.plan import LayerPlan, Plan

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

E, VOCAB, TOKENS = 32, 100, 12


class Logits(nn.Module):
    """A causal LM as a plain model: token ids ``(n, t)`` -> logits ``(n, t, vocab)``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


def tiny_gpt2() -> Logits:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=E, n_head=2, vocab_size=VOCAB, n_positions=32)
    return Logits(transformers.GPT2LMHeadModel(config)).eval()


@pytest.fixture(scope="module")
def gpt2() -> Logits:
    return tiny_gpt2()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (16, TOKENS), generator=torch.Generator().manual_seed(1))


def block_layers(model: nn.Module) -> list[str]:
    return [info.name for info in matrix_layers(model)]


def as_linear_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Conv1D layers are replaced by their nn.Linear equivalents."""
    twin = Logits(tiny_gpt2().lm)
    twin.load_state_dict(model.state_dict())
    for name, module in list(twin.named_modules()):
        if is_transformers_conv1d(module):
            set_submodule(twin, name, conv1d_as_linear(module))
    return twin.eval()


@torch.no_grad()
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ the adapter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nx, nf", [(32, 96), (128, 32), (7, 5)])
def test_adapter_linear_computes_the_conv1d(nx, nf, dtype):
    conv = Conv1D(nf, nx).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()
    before = state_bytes(conv)
    linear = canonical(conv)
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (nx, nf)
    assert linear.weight.dtype == dtype and linear.weight.is_contiguous()
    x = torch.randn(3, 5, nx, dtype=dtype)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(linear(x), conv(x), **tol)             # y = x W + b, W: (in, out)
    assert torch.equal(weight_matrix(conv), conv.weight.T) and torch.equal(linear.weight, conv.weight.T)
    with torch.no_grad():
        linear.weight.zero_()
    assert state_bytes(conv) == before                                 # copies: the original untouched
    assert matrix_kind(conv) == "linear"


def test_canonical_leaves_native_layers_as_they_are():
    linear, conv = nn.Linear(4, 3), nn.Conv2d(2, 3, 3)
    assert canonical(linear) is linear and canonical(conv) is conv
    assert not is_transformers_conv1d(linear) and matrix_kind(nn.Embedding(3, 2)) is None


# ------------------------------------------------------------------ inventory
def test_matrix_layers_lists_gpt2_conv1d_with_out_in_shapes(gpt2):
    infos = {info.name: info for info in matrix_layers(gpt2)}
    expected = {}
    for block in range(2):
        prefix = f"lm.transformer.h.{block}"
        expected.update({f"{prefix}.attn.c_attn": (3 * E, E), f"{prefix}.attn.c_proj": (E, E),
                         f"{prefix}.mlp.c_fc": (4 * E, E), f"{prefix}.mlp.c_proj": (E, 4 * E)})
    assert {name: info.shape for name, info in infos.items()} == expected  # lm_head is tied: left out
    assert {info.kind for info in infos.values()} == {"linear"}
    c_fc = gpt2.get_submodule("lm.transformer.h.0.mlp.c_fc")
    assert infos["lm.transformer.h.0.mlp.c_fc"].params == c_fc.weight.numel() + c_fc.bias.numel()


def test_inventory_lists_embeddings_lm_head_and_reasons(gpt2):
    rows = {row.name: row for row in inventory(gpt2)}
    wte, wpe, head = rows["lm.transformer.wte"], rows["lm.transformer.wpe"], rows["lm.lm_head"]
    assert (wte.kind, wte.shape, wte.params) == ("embedding", (VOCAB, E), VOCAB * E)
    assert (wpe.kind, wpe.shape, wpe.params) == ("embedding", (32, E), 32 * E)
    assert "lookup table" in wte.reason and wte.tied_with == ("lm.lm_head",)
    assert head.lm_head and (head.kind, head.shape) == ("linear", (VOCAB, E))
    assert head.tied_with == ("lm.transformer.wte",) and "tied" in head.reason
    assert "1-D weights" in rows["lm.transformer.h.0.ln_1"].reason
    offered = set(block_layers(gpt2))
    assert {name for name, row in rows.items() if row.reason is None} == offered
    assert all(rows[name].type == "Conv1D" for name in offered)
    assert not any(row.lm_head for name, row in rows.items() if name != "lm.lm_head")


def test_calibration_inputs_of_a_conv1d_are_token_rows(gpt2, ids):
    name = "lm.transformer.h.0.mlp.c_proj"
    inputs = collect_layer_inputs(gpt2, [name], ids)[name]
    assert inputs.shape == (len(ids) * TOKENS, 4 * E)


# ------------------------------------------------------------------ compression
def test_svd_at_ratio_half_halves_the_block_weights(gpt2, ids):
    before_state = state_bytes(gpt2)
    plan = wb.get_recipe("svd")(gpt2, ratio=0.5)
    assert set(plan.layers) == set(block_layers(gpt2))
    compressed = wb.apply(gpt2, plan)
    assert state_bytes(gpt2) == before_state
    blocks_before, blocks_after = gpt2.lm.transformer.h, compressed.lm.transformer.h
    matrices_before = sum(p.numel() for p in blocks_before.parameters() if p.dim() == 2)
    matrices_after = sum(p.numel() for p in blocks_after.parameters() if p.dim() == 2)
    assert 0.45 * matrices_before <= matrices_after <= 0.5 * matrices_before
    assert count_params(blocks_after) <= 0.5 * count_params(blocks_before)
    assert all(isinstance(compressed.get_submodule(name), LowRankLinear) for name in plan.layers)
    assert compressed(ids).shape == (len(ids), TOKENS, VOCAB)


def test_svd_logits_stay_close_at_high_rank(gpt2, ids):
    reference = gpt2(ids)
    full = Plan({info.name: LayerPlan("svd", {"rank": min(info.shape)}) for info in matrix_layers(gpt2)})
    torch.testing.assert_close(wb.apply(gpt2, full)(ids), reference, atol=1e-5, rtol=1e-4)
    errors = [relative_error(wb.apply(gpt2, wb.get_recipe("svd")(gpt2, ratio=ratio))(ids), reference)
              for ratio in (0.5, 0.7, 0.9)]
    assert errors[0] > errors[1] > errors[2]


METHODS = {
    "svd": ({"rank": 8}, LowRankLinear),
    "svd_aware": ({"rank": 8, "aware": "whiten"}, LowRankLinear),
    "prune": ({"ratio": 0.5}, SparseLinear),
    "quant": ({"bits": 4}, QuantLinear),
    "int8": ({}, Int8Linear),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_linear_method_compresses_gpt2_as_it_does_the_linear_twin(gpt2, ids, method):
    """Oracle: the same plan on a copy whose Conv1D layers are nn.Linear gives the same model."""
    params, layer_type = METHODS[method]
    before = state_bytes(gpt2)
    plan = Plan({name: LayerPlan(method, params) for name in block_layers(gpt2)})
    compressed = wb.apply(gpt2, plan, calibration_inputs=ids)
    assert state_bytes(gpt2) == before
    for name in plan.layers:
        assert isinstance(compressed.get_submodule(name), layer_type)
    twin = as_linear_twin(gpt2)
    torch.testing.assert_close(twin(ids), gpt2(ids), atol=1e-5, rtol=1e-5)
    expected = wb.apply(twin, plan, calibration_inputs=ids)
    out = compressed(ids)
    assert out.shape == (len(ids), TOKENS, VOCAB) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected(ids), atol=1e-4, rtol=1e-4)
    assert count_params(compressed) == count_params(expected)
    if method == "prune":
        layer = compressed.get_submodule(block_layers(gpt2)[0])
        assert layer.density() == pytest.approx(0.5, abs=0.01)
    if method == "quant":
        assert {compressed.get_submodule(name).bits for name in plan.layers} == {4}


def test_recipes_choose_gpt2_layers(gpt2):
    for name in ("quant", "int8"):
        options = {"bits": 4} if name == "quant" else {}
        assert set(wb.get_recipe(name)(gpt2, **options).layers) == set(block_layers(gpt2))
    assert set(wb.get_recipe("prune")(gpt2, ratio=0.5).layers) == set(block_layers(gpt2))


def test_engine_evaluates_gpt2_plans_as_apply_does(gpt2, ids):
    task = wb.load(gpt2, eval_data=ids)
    engine = wb.Engine(task, freeze_gc=False)
    plan = wb.get_recipe("svd")(gpt2, ratio=0.5)
    for candidate in (plan, plan.with_layer("lm.transformer.h.1.mlp.c_fc", LayerPlan("svd", {"rank": 3}))):
        result = engine.evaluate(candidate)
        model = wb.apply(task.model, candidate)
        assert result["metric"] == task.evaluate(model)
        assert result["params"] == count_params(model)
        assert result["flops"] == count_flops(model, task.example_input)
    aware = Plan({name: LayerPlan("svd_aware", {"rank": 6, "aware": "whiten"}) for name in block_layers(gpt2)})
    expected = task.evaluate(wb.apply(task.model, aware, calibration_inputs=task.calibration_inputs()))
    assert engine.evaluate(aware)["metric"] == expected
    preview = engine.preview("lm.transformer.h.0.mlp.c_fc", 4)
    w = weight_matrix(gpt2.get_submodule("lm.transformer.h.0.mlp.c_fc")).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    truncated = (u[:, :4] * s[:4]) @ vh[:4]
    assert preview["weight_error"] == pytest.approx(float((w - truncated).norm() / w.norm()), rel=1e-6)


def test_compressed_gpt2_saves_and_loads(gpt2, ids, tmp_path):
    plan = wb.get_recipe("svd")(gpt2, ratio=0.5).with_layer("lm.transformer.h.0.mlp.c_fc",
                                                             LayerPlan("quant", {"bits": 4}))
    compressed = wb.apply(gpt2, plan)
    path = wb.save_compressed(tmp_path / "gpt2.safetensors", compressed, plan, model_name="tiny-gpt2",
                              original=gpt2)
    loaded = wb.load_compressed(path, original=gpt2)
    assert loaded.plan == plan and loaded.model_name == "tiny-gpt2"
    assert torch.equal(loaded.model(ids), compressed(ids))


# ------------------------------------------------------------------ refused with a reason
def test_bad_choices_on_a_conv1d_are_refused(gpt2):
    name = "lm.transformer.h.0.mlp.c_fc"
    with pytest.raises(UnsupportedLayerError, match=r"layer 'lm.transformer.h.0.mlp.c_fc' of type Conv1D"):
        wb.apply(gpt2, Plan({name: LayerPlan("svd_rnn", {"rank_ih": 2})}))
    with pytest.raises(WorkbenchError, match=r"rank=33.*32"):  # min(out, in) of the (128, 32) matrix
        wb.apply(gpt2, Plan({name: LayerPlan("svd", {"rank": 33})}))
    # structured pruning of a GPT-2 projection prunes its block's heads and FFN width (a prune_heads step)
    (step,) = wb.get_recipe("prune")(gpt2, ratio=0.5, structured=True, layers=[name]).steps
    assert step.method == "prune_heads" and step.params["blocks"] == ("lm.transformer.h.0",)
