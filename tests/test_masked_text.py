"""Padded texts through a copy of the model (`workbench.zoo.masked_text`): each batch trimmed to its
longest text, outputs widened back with zeros at padding, texts grouped by length for the engine."""
import pytest
import torch

import workbench as wb
from workbench.zoo.masked_text import BUCKET_WASTE, is_ids_and_mask, length_buckets, with_attention_mask

transformers = pytest.importorskip("transformers")


def ids_and_mask(lengths, width=None, vocab=50, seed=0):
    """``(n, 2, T)`` random ids padded with 0 on the right, and their mask."""
    generator = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    out = torch.zeros(len(lengths), 2, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        out[row, 0, :length] = torch.randint(5, vocab, (length,), generator=generator)
        out[row, 1, :length] = 1
    return out


def tiny_bert():
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50,
        max_position_embeddings=64)).eval()


def test_a_batch_runs_trimmed_and_comes_back_full_width_with_zeros_at_padding():
    bert = tiny_bert()
    masked = with_attention_mask(bert)
    inputs = ids_and_mask([5, 3, 4], width=9)  # two columns are padding in every row
    seen = []
    handle = masked.embeddings.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape),
                                                         with_kwargs=True)
    with torch.no_grad():
        out = masked(inputs).last_hidden_state
    handle.remove()
    assert seen == [torch.Size([3, 5])]  # trimmed to the longest text
    assert out.shape == (3, 9, 32)
    assert torch.all(out[inputs[:, 1] == 0] == 0) and torch.all(out[inputs[:, 1] == 1].abs().sum(-1) > 0)
    with torch.no_grad():
        for row, length in enumerate([5, 3, 4]):  # the real tokens equal the text run alone
            alone = bert(inputs[row:row + 1, 0, :length]).last_hidden_state[0]
            assert torch.allclose(out[row, :length], alone, atol=1e-5)
        # called the usual way, the copy is the model
        plain = masked(input_ids=inputs[:, 0], attention_mask=inputs[:, 1]).last_hidden_state
        assert torch.equal(plain, bert(input_ids=inputs[:, 0], attention_mask=inputs[:, 1]).last_hidden_state)
    assert not bert._forward_pre_hooks and not bert._forward_hooks and not hasattr(bert, "evaluation_batches")


def test_length_buckets_cover_every_text_once_and_keep_waste_bounded():
    lengths = [31, 7, 12, 30, 8, 25, 26, 9, 13, 3]
    inputs = ids_and_mask(lengths)
    groups = length_buckets(inputs)
    assert sorted(torch.cat(groups).tolist()) == list(range(len(lengths)))
    for group in groups:
        sizes = [lengths[i] for i in group.tolist()]
        assert min(sizes) >= (1 - BUCKET_WASTE) * max(sizes)
    padded = sum(len(g) * max(lengths[i] for i in g.tolist()) for g in groups)
    assert padded < len(lengths) * max(lengths)  # fewer tokens than one batch padded to the longest


def test_engine_on_padded_texts_equals_apply_and_runs_fewer_tokens():
    masked = with_attention_mask(tiny_bert())
    inputs = ids_and_mask([3, 12, 4, 11, 12, 3, 5, 10], seed=1)
    assert is_ids_and_mask(inputs)
    task = wb.load(masked, eval_data=inputs)
    engine = wb.Engine(task, freeze_gc=False)
    assert len(engine._batches) > 1  # grouped by length
    plan = wb.Plan({"encoder.layer.2.output.dense": wb.LayerPlan("svd", {"rank": 4})})
    result = engine.evaluate(plan)
    assert result["from_stage"] > 0
    assert result["metric"] == pytest.approx(task.evaluate(wb.apply(task.model, plan)), abs=1e-6)
