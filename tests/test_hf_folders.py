"""Local Hugging Face folders (`workbench.zoo.hf`): tiny BERT and GPT-2 saved with
``save_pretrained``, texts tokenized offline, safetensors only, and clear refusals."""
import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.measure import count_params
from workbench.zoo.user import FIDELITY_NAME, LOAD_OPTIONS, PERPLEXITY_NAME, perplexity

transformers = pytest.importorskip("transformers")
# resolve transformers' lazy classes at collection, so the tests time their own work
_CLASSES = (transformers.BertModel, transformers.GPT2LMHeadModel, transformers.LlamaForCausalLM,
            transformers.BertTokenizerFast, transformers.AutoTokenizer)

WORDS = ("the a cat dog sat ran on under mat rug big small red blue quick slow fox jumps over lazy "
         "bird sings tree house river flows fast cold warm sun moon star night day").split()
TEXTS = ["the cat sat on the mat", "a dog ran under the big red rug",
         "the quick fox jumps over the lazy dog", "a bird sings in the tree at night",
         "the river flows fast under the cold moon", "a small blue house on the warm day"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(extra=0):
    """A word-level BERT tokenizer with the special tokens, WORDS and ``extra`` filler tokens."""
    tokens = SPECIALS + WORDS + [f"w{i}" for i in range(extra)]
    return transformers.BertTokenizerFast(vocab={token: i for i, token in enumerate(tokens)})


def vocab_size(extra=0):
    return len(SPECIALS) + len(WORDS) + extra


def save_bert(folder, with_tokenizer=True):
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=vocab_size(), max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return model


def save_causal(folder, kind="gpt2"):
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=64, vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3, pad_token_id=0))
    model.eval().save_pretrained(folder, safe_serialization=True)
    return model


def test_options_listed():
    assert "texts" in LOAD_OPTIONS and "tokenizer" in LOAD_OPTIONS


def test_bert_folder_with_its_own_tokenizer(tmp_path):
    original = save_bert(tmp_path)
    task = wb.load(str(tmp_path), texts=TEXTS)
    assert type(task.model).__name__ == "BertModel" and task.metric_name == FIDELITY_NAME
    lengths = [len(tiny_tokenizer()(t)["input_ids"]) for t in TEXTS]
    assert tuple(task.eval_inputs.shape) == (len(TEXTS), 2, max(lengths)) == (len(TEXTS), 2, task.extras["text_tokens"])
    assert task.eval_inputs[:, 1].sum(1).tolist() == lengths == [int(n) for n in task.eval_inputs[:, 1].sum(1)]
    assert task.extras["real_tokens"] == sum(lengths)
    assert int(task.eval_inputs[0, 0, 0]) == SPECIALS.index("[CLS]")  # special tokens kept
    assert SPECIALS.index("[UNK]") not in task.eval_inputs[0, 0].tolist()  # the words were found
    for name, tensor in original.state_dict().items():  # the weights read are the ones saved
        assert torch.equal(task.model.state_dict()[name], tensor), name
    assert task.evaluate() == pytest.approx(1.0)
    compressed = wb.apply(task.model, wb.recipe("svd")(task.model, ratio=0.5))
    score = task.evaluate(compressed)
    assert 0.0 < score < 1.0 - 1e-6


def test_texts_from_a_txt_file_and_a_tokenizer_folder(tmp_path):
    save_bert(tmp_path / "model", with_tokenizer=False)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(TEXTS[:3]) + "\n\n")
    task = wb.load(tmp_path / "model", texts=lines, tokenizer=str(tmp_path / "tok"))
    expected = [tokenizer(t)["input_ids"] for t in TEXTS[:3]]
    longest = max(map(len, expected))
    pad = SPECIALS.index("[PAD]")
    assert task.eval_inputs[:, 0].tolist() == [ids + [pad] * (longest - len(ids)) for ids in expected]
    assert task.eval_inputs[:, 1].tolist() == [[1] * len(ids) + [0] * (longest - len(ids)) for ids in expected]


def test_padded_texts_score_as_each_text_alone():
    """The oracle of the attention mask: a BERT's outputs at the real tokens of a padded batch equal
    each text run alone, and a GPT-2's perplexity on the padded batch equals the token-weighted
    perplexity of the texts run one by one without padding. The user's model is not touched."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=vocab_size(), max_position_embeddings=64)).train()
    task = wb.load(bert, texts=TEXTS, tokenizer=tokenizer)
    assert task.model is not bert and bert.training and not bert._forward_pre_hooks
    with torch.no_grad():
        batch = task.model.eval()(task.eval_inputs).last_hidden_state
        for row, text in enumerate(TEXTS):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            alone = bert.eval()(ids).last_hidden_state[0]
            assert torch.allclose(batch[row, :len(alone)], alone, atol=1e-5), text
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size())).eval()
    task = wb.load(gpt, texts=TEXTS, tokenizer=tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = gpt(ids).logits
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert task.evaluate() == pytest.approx(float(torch.exp(torch.tensor(total / count, dtype=torch.float64))), rel=1e-5)


def test_texts_need_a_model_that_takes_a_mask():
    class IdsOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab_size(), 8)

        def forward(self, input_ids):
            return self.embed(input_ids)

    with pytest.raises(WorkbenchError, match="IdsOnly.forward takes no attention_mask"):
        wb.load(IdsOnly(), texts=TEXTS, tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("kind, cls, layer", [("gpt2", "GPT2LMHeadModel", "transformer.h.0.attn.c_attn"),
                                              ("llama", "LlamaForCausalLM", "model.layers.0.mlp.up_proj")])
def test_causal_lm_folder_is_judged_by_perplexity(tmp_path, kind, cls, layer):
    save_causal(tmp_path, kind)
    tokenizer = tiny_tokenizer()
    task = wb.load(tmp_path, texts=TEXTS, tokenizer=tokenizer)
    assert type(task.model).__name__ == cls
    assert task.metric_name == PERPLEXITY_NAME and task.higher_is_better is False
    ids, mask = task.eval_inputs[:, 0], task.eval_inputs[:, 1]
    assert torch.equal(task.eval_targets, ids.masked_fill(mask == 0, -100))  # padding is not scored
    with torch.no_grad():
        logits = task.model(task.eval_inputs).logits
    original = task.evaluate()
    assert original == pytest.approx(perplexity(logits, task.eval_targets))
    assert 1.0 < original < 2 * vocab_size()  # random weights: near a uniform guess
    plan = wb.recipe("svd")(task.model, ratio=0.5)
    assert layer in plan.layers  # GPT-2's Conv1D layers are offered as Llama's Linear ones
    compressed = wb.apply(task.model, plan)
    assert count_params(compressed) < count_params(task.model)
    score = task.evaluate(compressed)
    assert score != pytest.approx(original) and task.better(original, score) == (score > original)


class Evil:
    """Unpickling this would create a file: a stand-in for malicious code in a pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_bin_only_folder_is_refused_without_unpickling(tmp_path):
    save_bert(tmp_path, with_tokenizer=False)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"weight": Evil(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WorkbenchError, match=r"pytorch_model\.bin.*pickle.*safetensors only"):
        wb.load(tmp_path, texts=TEXTS, tokenizer=tiny_tokenizer())
    assert not marker.exists()


def test_module_in_memory_with_texts_and_a_tokenizer_object():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, n_positions=8, vocab_size=vocab_size(), bos_token_id=2, eos_token_id=3))
    task = wb.load(model, texts=TEXTS, tokenizer=tiny_tokenizer())
    assert task.metric_name == PERPLEXITY_NAME and task.eval_inputs.shape[-1] == min(8, max(
        len(tiny_tokenizer()(t)["input_ids"]) for t in TEXTS))
    long = wb.load(model, texts=[" ".join(WORDS)], tokenizer=tiny_tokenizer())
    assert long.eval_inputs.shape == (1, 2, 8)  # truncated to the model's n_positions


def test_mismatched_tokenizer_is_refused_naming_both_sizes(tmp_path):
    save_bert(tmp_path, with_tokenizer=False)
    big = tiny_tokenizer(extra=10)
    with pytest.raises(WorkbenchError, match=rf"{vocab_size(10)} tokens .* vocabulary has {vocab_size()}"):
        wb.load(tmp_path, texts=TEXTS, tokenizer=big)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(WorkbenchError, match="no config.json"):
        wb.load(tmp_path, texts=TEXTS)


@pytest.mark.parametrize("options, message", [
    ({"texts": TEXTS}, "needs tokenizer="),
    ({"tokenizer": "x"}, "goes with texts="),
    ({"texts": TEXTS, "eval_data": torch.zeros(2, 3, dtype=torch.long)}, "not both"),
    ({"texts": "no-such-file.txt"}, "not a file"),
    ({"texts": []}, "holds no text"),
])
def test_bad_text_options(tmp_path, options, message):
    save_bert(tmp_path, with_tokenizer=False)
    with pytest.raises(WorkbenchError, match=message):
        wb.load(tmp_path, **options)


def test_the_command_line_compresses_a_folder_judged_on_texts(tmp_path, capsys):
    import json

    from workbench.cli import main

    save_causal(tmp_path / "gpt")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    code = main(["compress", str(tmp_path / "gpt"), "--texts", str(tmp_path / "texts.txt"), "--method", "svd",
                 "--ratio", "0.5", "--json"])
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert code == 0 and out["after"]["params"] < out["before"]["params"]
    assert main(["compress", str(tmp_path / "gpt"), "--method", "svd", "--ratio", "0.5"]) == 2
    assert "exactly one of --texts" in capsys.readouterr().err
