"""Any model's outputs (`workbench.zoo.outputs`) and models built from `transformers` configs
(random weights, nothing downloaded): GPT-2, BERT and Llama loaded as user models, the default
metric following the model (perplexity for a causal LM, checked against a hand computation),
``output=`` choices, and compression end to end."""
import math
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.zoo.outputs import describe_output, natural_key, select_output
from workbench.zoo.user import FIDELITY_NAME, PERPLEXITY_NAME, perplexity

transformers = pytest.importorskip("transformers")

A, B, C = torch.ones(2, 3), torch.zeros(2, 5), torch.full((2, 7), 2.0)
Pair = namedtuple("Pair", ["features", "logits"])


@dataclass
class Result:
    loss: object
    hidden: torch.Tensor


# ---- select_output on every kind of output ---------------------------------------------------

@pytest.mark.parametrize("out, output, expected", [
    (A, None, A),
    ((A, B), None, A),
    ([None, (B, A)], None, B),                                          # depth first, None skipped
    ({"hidden": B, "logits": A}, None, A),                              # logits preferred
    ({"pooler_output": B, "last_hidden_state": A}, None, A),
    ({"extra": "text", "value": C}, None, C),                           # first tensor otherwise
    (Pair(B, A), None, A),                                              # named tuple: by field
    (Result(None, C), None, C),                                         # dataclass
    ({"hidden": B, "logits": A}, "hidden", B),
    ((A, B, C), 2, C),
    (Pair(B, A), "features", B),
    (Result(None, C), "hidden", C),
    ({"hidden": B, "logits": A}, lambda out: out["hidden"] * 2, B * 2),
])
def test_select_output_of_every_kind(out, output, expected):
    assert torch.equal(select_output(out, output), expected)


def test_transformers_model_outputs_are_understood():
    from transformers.modeling_outputs import BaseModelOutputWithPooling, CausalLMOutputWithPast

    lm = CausalLMOutputWithPast(logits=A, hidden_states=(B, C))
    assert select_output(lm) is A and natural_key(lm) == "logits"
    encoder = BaseModelOutputWithPooling(last_hidden_state=B, pooler_output=C)
    assert select_output(encoder) is B and select_output(encoder, "pooler_output") is C
    assert describe_output(encoder) == "BaseModelOutputWithPooling with keys 'last_hidden_state', 'pooler_output'"
    with pytest.raises(WorkbenchError, match=r"output='logits': the model returns no such key; it returns "
                                             r"BaseModelOutputWithPooling with keys 'last_hidden_state', 'pooler_output'"):
        select_output(encoder, "logits")


@pytest.mark.parametrize("out, output, message", [
    ({"a": A}, "b", r"output='b': the model returns no such key; it returns dict with keys 'a'"),
    ((A, B), 5, r"output=5: the model returns no such index; it returns a tuple of 2"),
    (A, "logits", r"names an entry, but the model returns a tensor \(2, 3\)"),
    ({"a": A, "n": 3}, "n", r"output='n' is an int, not a tensor"),
    ({"a": A}, lambda out: out["a"].tolist(), r"returned a list of 2, not a tensor"),
    ({"a": A}, True, r"output=True must be None, a key \(str\), an index \(int\) or a callable"),
    (("text", None), None, r"returned a tuple of 2, which holds no tensor"),
])
def test_bad_output_choices_are_refused(out, output, message):
    with pytest.raises(WorkbenchError, match=message):
        select_output(out, output)


# ---- models built from transformers configs --------------------------------------------------

def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                                                n_positions=64))


def bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64))


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64))


@pytest.fixture(scope="module")
def ids():
    return torch.randint(100, (24, 16), generator=torch.Generator().manual_seed(1))


def hand_perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Oracle: exp of minus the mean log-probability of each next token, in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)[:, :-1]
    return math.exp(-float(logp.gather(-1, ids[:, 1:, None]).mean()))


@pytest.mark.parametrize("build", [gpt2, llama])
def test_causal_lm_default_metric_is_perplexity(build, ids):
    model = build()
    assert model.training                                  # built from a config: training mode
    task = wb.load(model, eval_data=ids)
    assert model.training and all(m.training for m in model.modules())   # left as it was
    assert task.metric_name == PERPLEXITY_NAME and task.higher_is_better is False
    assert task.better(90.0, 100.0) and not task.better(100.0, 90.0)
    assert torch.equal(task.eval_targets, ids)
    with torch.no_grad():
        logits = model.eval()(ids).logits
    model.train()
    expected = hand_perplexity(logits, ids)
    assert task.evaluate() == pytest.approx(expected, rel=1e-5)
    assert 50 < expected < 200                              # random weights over 100 tokens: near uniform
    assert model.training


def test_perplexity_oracle_on_known_logits():
    ids = torch.tensor([[0, 1, 2], [2, 2, 0]])
    uniform = torch.zeros(2, 3, 5)
    assert perplexity(uniform, ids) == pytest.approx(5.0)   # uniform over V: perplexity V
    sure = torch.full((2, 3, 5), -1e4)
    sure[0, 0, 1] = sure[0, 1, 2] = sure[1, 0, 2] = sure[1, 1, 0] = 0.0
    assert perplexity(sure, ids) == pytest.approx(1.0)      # the right next token, certain
    with pytest.raises(WorkbenchError, match=r"T >= 2; got logits \(2, 1, 5\)"):
        perplexity(uniform[:, :1], ids[:, :1])


def test_bert_encoder_output_fidelity_and_output_choice(ids):
    model = bert()
    task = wb.load(model, eval_data=ids)
    assert task.metric_name == FIDELITY_NAME and task.higher_is_better is True
    assert task.eval_targets.shape == (24, 16, 32)          # last_hidden_state
    assert task.evaluate() == pytest.approx(1.0) and model.training
    pooled = wb.load(model, eval_data=ids, output="pooler_output")
    assert pooled.eval_targets.shape == (24, 32)
    with pytest.raises(WorkbenchError, match=r"output='logits'.*keys 'last_hidden_state', 'pooler_output'"):
        wb.load(model, eval_data=ids, output="logits")
    assert model.training


@pytest.mark.parametrize("build", [bert, llama])
def test_compressed_transformer_end_to_end(build, ids):
    model = build()
    task = wb.load(model, eval_data=ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = wb.recipe("svd")(task.model, ratio=0.5)
    assert len(plan.layers) >= 8                            # q, k, v, o and the MLP of both blocks
    small = wb.apply(task.model, plan)
    assert wb.measure(small, task)["params"] < wb.measure(task.model, task)["params"]
    original, compressed = task.evaluate(), task.evaluate(small)
    assert math.isfinite(compressed) and compressed != original
    if task.higher_is_better:
        assert 0.5 < compressed < original
    engine = wb.Engine(task, preview=False)                 # the engine judges the same tensor
    assert engine.evaluate(plan)["metric"] == pytest.approx(compressed, rel=1e-4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.training


def test_language_model_with_a_user_metric_gets_its_token_ids(ids):
    seen = {}

    def top1(logits, targets):
        seen["targets"] = targets
        return float((logits[:, :-1].argmax(-1) == targets[:, 1:]).float().mean())

    task = wb.load(gpt2(), eval_data=ids, metric=top1, train_data=ids[:8])
    assert task.evaluate() == pytest.approx(top1(task.outputs(), ids)) and torch.equal(seen["targets"], ids)
    assert task.higher_is_better and torch.equal(task.train_targets, ids[:8])


def test_float_inputs_to_a_language_model_are_refused_with_their_shape(ids):
    with pytest.raises(WorkbenchError, match=r"eval_data of shape \(24, 16\) \(torch.float32\) does not fit"):
        wb.load(gpt2(), eval_data=ids.float())
