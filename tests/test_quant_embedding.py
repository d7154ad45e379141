"""Row-wise quantized embedding tables and tied LM heads. Oracles: brute-force nearest grid value per
entry (half a step at most), ``F.embedding`` on the dequantized table, the closed-form bytes
``V * ceil(d b / 8) + 3 V``, a GPT-2 whose head is tied to its table (perplexity, one copy of the
codes in the file, bit-exact reload, engine = apply), MiniLM's mean cosine and file size."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import workbench as wb
from conftest import state_bytes as snapshot
from workbench.engine import Engine
from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import embedding_units, inventory, matrix_layers
from workbench.kernels import row_quant
from workbench.layers.quant_embedding import QuantEmbedding
from workbench.plan import LayerPlan, Plan
from workbench.ties import payload_bytes

GROUP = ("lm_head", "transformer.wte")
V, D = 128, 64


def closed_form(rows: int, dim: int, bits: int) -> int:
    return rows * math.ceil(dim * bits / 8) + rows * (2 + 1)


def table(rows=37, dim=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, dim, generator=g) * torch.rand(rows, 1, generator=g) * 3
    w[1] = 0.0  # a zero row (padding): exactly zero on the grid
    w[2] = w[2].abs()  # an all-positive row: the range still holds 0
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("dim", [13, 16])
def test_rows_are_round_to_nearest_on_their_asymmetric_grid(bits, dim):
    w = table(dim=dim)
    layer = QuantEmbedding.from_weight(w, bits)
    w_hat = layer.dequantized_weight()
    scale, zero = layer.scale.float(), layer.zero_point.float()
    grid = scale[:, None] * (torch.arange(2 ** bits).float()[None, :] - zero[:, None])  # (rows, 2^b)
    best = (w[:, :, None] - grid[:, None, :]).abs().min(dim=2).values
    assert torch.allclose((w - w_hat).abs(), best, atol=1e-6)  # the nearest grid value, entry by entry
    assert ((w - w_hat).abs() <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (w_hat[1] == 0).all() and layer.scale.dtype == torch.float16 and layer.zero_point.dtype == torch.uint8
    ids = torch.tensor([[0, 5, 5, 36], [1, 2, 36, 0]])
    assert torch.equal(layer(ids), F.embedding(ids, w_hat))
    state = layer.state_dict()
    assert set(state) == {"packed", "scale", "zero_point"}
    assert payload_bytes(state) == closed_form(37, dim, bits)


def test_packed_rows_round_trip_and_a_lookup_dequantizes_only_its_rows(monkeypatch):
    codes = torch.randint(0, 8, (9, 7), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = row_quant.pack_rows(codes, 3)
    assert packed.shape == (9, 3) and torch.equal(row_quant.unpack_rows(packed, 3, 7), codes)
    assert torch.equal(row_quant.unpack_rows(packed[[4, 1]], 3, 7), codes[[4, 1]])  # rows read alone
    layer = QuantEmbedding.from_weight(table(), 4)
    seen = []
    original = row_quant.dequantize_rows
    monkeypatch.setattr(row_quant, "dequantize_rows", lambda c, s, z: seen.append(c.shape[0]) or original(c, s, z))
    layer(torch.tensor([3, 3, 7, 3]))
    assert seen == [2]  # the two distinct ids, not the 37 rows


def test_padding_idx_is_kept_max_norm_and_bags_are_refused():
    torch.manual_seed(0)
    model = Lookup(padding_idx=3)
    before = snapshot(model)
    q = wb.apply(model, wb.recipe("quant_embedding")(model, bits=4)).emb
    assert isinstance(q, QuantEmbedding) and q.padding_idx == 3 and "padding_idx=3" in repr(q)
    assert (q(torch.tensor([3])) == 0).all() and snapshot(model) == before  # the zero row stays zero
    with pytest.raises(WorkbenchError, match="max_norm=1.0"):
        QuantEmbedding.from_embedding(nn.Embedding(20, 8, max_norm=1.0), 4)
    with pytest.raises(UnsupportedLayerError, match="EmbeddingBag"):
        QuantEmbedding.from_embedding(nn.EmbeddingBag(20, 8), 4)
    with pytest.raises(UnsupportedLayerError, match="has a bias"):
        QuantEmbedding.from_embedding(nn.Linear(8, 20), 4)


class Lookup(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.emb, self.out = nn.Embedding(20, 8, **options), nn.Linear(8, 3)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


@pytest.mark.parametrize("bits", [1, 9, 0, "8", True, 4.0, None])
def test_bad_bits_are_refused(bits):
    model = Lookup()
    with pytest.raises(WorkbenchError, match="bits"):
        wb.recipe("quant_embedding")(model, bits=bits)
    with pytest.raises(WorkbenchError, match="bits"):
        wb.apply(model, Plan({"emb": LayerPlan("quant_embedding", {"bits": bits})}))


def test_recipes_refuse_what_they_cannot_take():
    with pytest.raises(WorkbenchError, match="max_norm"):
        wb.recipe("quant_embedding")(Lookup(max_norm=2.0), bits=8)
    with pytest.raises(UnsupportedLayerError, match="'out' is not an embedding table.*handles: emb"):
        wb.recipe("quant_embedding")(Lookup(), bits=8, layers=["out"])
    with pytest.raises(WorkbenchError, match="include_embeddings needs bits from 2 to 8"):
        wb.recipe("quant")(Lookup(), bits=1, include_embeddings=True)
    with pytest.raises(UnsupportedLayerError, match="'out'.*has a bias"):
        wb.apply(Lookup(), Plan({"out": LayerPlan("quant_embedding", {"bits": 4})}))
    with pytest.raises(WorkbenchError, match="does not take option 'group_size'"):
        wb.apply(Lookup(), Plan({"emb": LayerPlan("quant_embedding", {"bits": 4, "group_size": 8})}))


# ------------------------------------------------------------------ a GPT-2 with its head tied to wte
@pytest.fixture(scope="module")
def gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=4, vocab_size=V, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def gpt2_task(gpt2):
    return wb.load(gpt2, eval_data=torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(0)))


def test_inventory_offers_tables_and_the_tied_head_to_quant_embedding(gpt2):
    units, dense = embedding_units(gpt2)
    assert [names for names, _ in units] == [("transformer.wte", "lm_head"), ("transformer.wpe",)] and not dense
    assert units[0][1].shape == (V, D) and units[0][1].params == V * D
    rows = {row.name: row for row in inventory(gpt2)}
    assert "quant_embedding" in rows["transformer.wte"].reason and "lookup table" in rows["transformer.wpe"].reason
    assert not {"transformer.wte", "lm_head"} & {info.name for info in matrix_layers(gpt2)}  # unchanged


def test_tied_table_and_head_quantized_as_one(gpt2, gpt2_task, tmp_path):
    before = snapshot(gpt2)
    plan = wb.recipe("quant_embedding")(gpt2, bits=8, layers=["lm_head"])
    assert dict(plan.layers) == dict.fromkeys(GROUP, LayerPlan("quant_embedding", {"bits": 8}))
    model = wb.apply(gpt2, plan)
    assert model.lm_head is model.transformer.wte and isinstance(model.lm_head, QuantEmbedding)
    ids = gpt2_task.eval_inputs[:2]
    w_hat = model.lm_head.dequantized_weight()
    with torch.no_grad():
        hidden = model.transformer(ids).last_hidden_state
        assert torch.equal(model.lm_head(hidden), F.linear(hidden, w_hat))  # the head on the same codes
        assert torch.equal(model.transformer.wte(ids), F.embedding(ids, w_hat))
    base, metric = gpt2_task.evaluate(gpt2), gpt2_task.evaluate(model)
    assert abs(metric - base) / base < 0.01
    saved_fp32 = V * D * 4 - closed_form(V, D, 8)
    assert payload_bytes(gpt2.state_dict()) - payload_bytes(model.state_dict()) == saved_fp32
    result = Engine(gpt2_task, freeze_gc=False).evaluate(plan)
    assert result["metric"] == metric and result["bytes"] == payload_bytes(model.state_dict())
    assert result["params"] == wb.measure(model, gpt2_task, latency=False)["params"]

    path = wb.save_compressed(tmp_path / "gpt2.safetensors", model, plan, "tiny-gpt2", original=gpt2)
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        packed = [k for k in keys if k.endswith(".packed")]
        assert len(packed) == 1  # the table's codes once for both names
        group = packed[0].removesuffix(".packed")
        stored = sum(handle.get_tensor(f"{group}.{k}").numel() * handle.get_tensor(f"{group}.{k}").element_size()
                     for k in ("packed", "scale", "zero_point"))
    assert stored == closed_form(V, D, 8)
    dense = wb.save_compressed(tmp_path / "dense.safetensors", gpt2, Plan({}), "tiny-gpt2", original=gpt2)
    assert abs((dense.stat().st_size - path.stat().st_size) - saved_fp32) < 4096  # headers differ a little
    loaded, loaded_plan, _ = wb.load_compressed(path, original=gpt2)
    assert loaded_plan == plan and loaded.lm_head is loaded.transformer.wte
    assert snapshot(loaded) == snapshot(model) and gpt2_task.evaluate(loaded) == metric
    assert snapshot(gpt2) == before and gpt2.lm_head.weight is gpt2.transformer.wte.weight


def test_quant_recipe_includes_embeddings_on_request(gpt2, gpt2_task):
    plain = wb.recipe("quant")(gpt2, bits=8)
    assert "lookup table" in plain.left_dense[("transformer.wte", "lm_head")]
    plan = wb.recipe("quant")(gpt2, bits=8, include_embeddings=True)
    assert not plan.left_dense
    assert {k: v for k, v in plan.layers.items() if v.method == "quant"} == dict(plain.layers)
    assert {k for k, v in plan.layers.items() if v.method == "quant_embedding"} == {*GROUP, "transformer.wpe"}
    model = wb.apply(gpt2, plan)
    assert payload_bytes(model.state_dict()) < payload_bytes(wb.apply(gpt2, plain).state_dict()) - 3 * V * D
    engine = Engine(gpt2_task, freeze_gc=False)
    assert engine.evaluate(plan)["metric"] == gpt2_task.evaluate(model)


@pytest.mark.slow
def test_minilm_embeddings_at_8_bits(tmp_path):
    from workbench.zoo import minilm
    task = wb.load("minilm")
    plan = wb.recipe("quant_embedding")(task.model, bits=8)
    tables = {name: task.model.get_submodule(name).weight.numel() for name in plan.layers}
    assert sum(tables.values()) > 11_000_000
    model = wb.apply(task.model, plan)
    assert task.evaluate(task.model) - task.evaluate(model) < 0.001  # mean cosine
    ref = task.outputs(task.model)
    assert minilm.mean_cosine(task.outputs(model), ref) > 0.999
    dense = wb.save_compressed(tmp_path / "dense.safetensors", task.model, Plan({}), "minilm")
    path = wb.save_compressed(tmp_path / "emb8.safetensors", model, plan, "minilm")
    fp32 = 4 * sum(tables.values())
    shrink = dense.stat().st_size - path.stat().st_size
    assert abs(shrink - (fp32 - sum(closed_form(*task.model.get_submodule(n).weight.shape, 8) for n in tables))) < 8192
    assert 0.74 < shrink / fp32 < 0.75
