"""MiniLM loads offline, matches sentence-transformers, and its metrics and data behave."""
import json
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.inventory import matrix_layers
from workbench.zoo import minilm


@pytest.fixture(scope="session")
def minilm_task():
    return wb.load("minilm")


def test_embeddings_match_sentence_transformers(minilm_task):
    from sentence_transformers import SentenceTransformer
    texts = ["The cat sat on the mat.", "Quarterly revenue rose by four percent.",
             "'Where are you going?' she asked.", minilm_task.extras["sentences"][0]]
    reference = SentenceTransformer(str(minilm.model_path()), device="cpu", local_files_only=True)
    expected = reference.encode(texts, convert_to_tensor=True)
    ours = minilm.embed(minilm_task.model, texts)
    assert ours.shape == (4, 384)
    assert torch.nn.functional.cosine_similarity(ours, expected).min() > 0.9999


def test_task_shape_layers_and_metric(minilm_task):
    layers = matrix_layers(minilm_task.model)
    assert len(layers) == 36 and all(info.kind == "linear" for info in layers)
    assert {minilm.layer_type(info.name) for info in layers} == set(minilm.LAYER_TYPES)
    assert sorted({minilm.block_of(info.name) for info in layers}) == list(range(6))
    assert minilm_task.eval_inputs.shape[1] == 2 and minilm_task.eval_inputs.dtype == torch.long
    assert minilm_task.eval_targets.shape == (len(minilm_task.extras["sentences"]), 384)
    assert minilm_task.metric(minilm_task.eval_targets, minilm_task.eval_targets) == pytest.approx(1.0)


def test_sentences_split_by_topic_and_calibration_has_enough_tokens(minilm_task):
    data = json.loads((Path(minilm.__file__).parents[1] / "resources" / "sentences.json").read_text())
    calibration, evaluation = data["calibration"], data["evaluation"]
    assert not set(calibration) & set(evaluation)
    assert not set(minilm.flat(calibration)) & set(minilm.flat(evaluation))
    assert len(minilm.flat(calibration)) + len(minilm.flat(evaluation)) >= 300
    counts = minilm_task.extras["calibration_counts"]
    # enough distinct text for X^T X of the widest input (the FFN's 1,536 features), 10 times over
    assert counts["unique_tokens"] >= 10 * 1536
    calib = minilm_task.calibration_inputs()
    assert calib.shape[0] * calib.shape[2] >= 10 * 1536
    assert bool((calib[:, 1] == 1).all())  # no padding in calibration
    assert bool((calib[:, 0, 0] == minilm.tokenizer().cls_token_id).all())


def test_validation_split_is_unseen_by_default_calibration_and_evaluation(minilm_task):
    texts = minilm_task.extras["validation_sentences"]
    assert len(texts) == len(minilm_task.val_inputs) == 5 * 80
    assert not set(texts) & set(minilm_task.extras["calibration_sentences"])
    assert not set(texts) & set(minilm_task.extras["sentences"])
    assert set(texts) <= set(minilm.flat(minilm.calibration_topics("extended")))
    # targets are the original's embeddings of those sentences, one sentence per row
    assert torch.allclose(minilm_task.val_targets[:3], minilm.embed(minilm_task.model, texts[:3]), atol=1e-5)
    assert minilm_task.metric(minilm_task.model(minilm_task.val_inputs[:8]), minilm_task.val_targets[:8]) \
        == pytest.approx(1.0, abs=1e-6)


def test_metrics_have_their_oracles():
    g = torch.Generator().manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    assert minilm.neighbour_agreement(ref, ref) == 1.0
    assert minilm.similarity_spearman(ref, ref) == pytest.approx(1.0)
    assert minilm.similarity_spearman(ref * 3, ref) == pytest.approx(1.0)  # scale-free
    noisy = ref + 0.05 * torch.randn(20, 8, generator=g)
    assert 0.9 < minilm.mean_cosine(noisy, ref) < 1.0
    shuffled = ref[torch.randperm(20, generator=g)]
    assert minilm.mean_cosine(shuffled, ref) < 0.5


def test_bad_input_shape_is_explained(minilm_task):
    with pytest.raises(wb.errors.WorkbenchError, match=r"\(n, 2, seq\)"):
        minilm_task.model(torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.slow
def test_compressing_one_block_aware_keeps_embeddings_close(minilm_task):
    from workbench.registry import get_recipe
    from tests.conftest import state_bytes
    names = [i.name for i in matrix_layers(minilm_task.model) if minilm.block_of(i.name) == 5]
    before = state_bytes(minilm_task.model)
    plan = get_recipe("svd")(minilm_task.model, ratio=0.5, layers=names, activation_aware="whiten")
    new = wb.apply(minilm_task.model, plan, calibration_inputs=minilm_task.calibration_inputs()[:96])
    plain = wb.apply(minilm_task.model, get_recipe("svd")(minilm_task.model, ratio=0.5, layers=names))
    sub = minilm_task.eval_inputs[:32]
    with torch.no_grad():
        ref = minilm_task.model(sub)
        aware_cos, plain_cos = minilm.mean_cosine(new(sub), ref), minilm.mean_cosine(plain(sub), ref)
    assert aware_cos > plain_cos and aware_cos > 0.8
    assert state_bytes(minilm_task.model) == before


def test_engine_reruns_only_the_blocks_after_a_move(minilm_task):
    from workbench.engine import Engine
    from workbench.measure import count_params
    from workbench.plan import LayerPlan, Plan
    engine = Engine(minilm_task, subset=12, preview=False)
    assert [s.name for s in engine.stages][:2] == ["bert.embeddings", "bert.encoder.layer.0"]
    sub = minilm_task.subset(12)
    assert engine.task.eval_inputs.shape[0] == 12 and engine.base["metric"] == pytest.approx(1.0, abs=1e-6)
    plan = Plan({"bert.encoder.layer.2.intermediate.dense": LayerPlan("svd", {"rank": 40})})
    assert engine.evaluate(plan)["from_stage"] == 3
    plan = plan.with_layer("bert.encoder.layer.5.attention.self.key", LayerPlan("svd", {"rank": 8}))
    result = engine.evaluate(plan)
    assert result["from_stage"] == 6 and result["stages_run"] == 1
    model = wb.apply(minilm_task.model, plan)
    with torch.no_grad():  # length-grouped batches, put back in order: the same embeddings
        expected = minilm.mean_cosine(model(sub.eval_inputs), sub.eval_targets)
    assert result["metric"] == pytest.approx(expected, abs=1e-5) and result["metric"] < 0.999
    assert result["params"] == count_params(model)


def test_explorer_starts_plain_and_fits_each_layer_once_for_every_rank(minilm_task, stand_in_aware_basis):
    from workbench.widgets import real_model
    calls = stand_in_aware_basis
    explorer = real_model.RealModelExplorer(minilm_task, calibration_sequences=4, eval_sentences=6,
                                            synchronous=True)
    assert explorer.mode.value == "plain" and calls == []
    plain = dict(explorer.state)
    explorer.ratio.value = 0.5
    assert calls == [] and explorer.state["mean_cosine"] < plain["mean_cosine"] <= 1.0
    explorer.mode.value = "whiten"
    assert calls == ["whiten"] * 36  # one activation-aware basis per layer (workbench.apply of the plan)
    explorer.ratio.value = 0.9       # another rank of the same weights and data: slices, no new fit
    explorer.ratio.value = 0.5       # a setting seen before is recalled
    assert calls == ["whiten"] * 36
    with pytest.raises(wb.errors.WorkbenchError, match="mode='svd'"):
        real_model.RealModelExplorer(minilm_task, mode="svd")


def test_packed_stages_encode_each_sentence_as_on_its_own(minilm_task):
    """The engine's stages pack several sentences into one row (block-diagonal attention, positions
    restarting per sentence): the embeddings equal the padded forward pass's."""
    from workbench.stages import model_stages
    inputs = minilm_task.eval_inputs[::3]
    ids, positions, segment = minilm.pack_rows(inputs)
    lengths = inputs[:, 1].sum(1)
    assert int((segment >= 0).sum()) == int(lengths.sum()) and ids.shape[0] < len(inputs)
    x = inputs
    with torch.no_grad():
        for stage in model_stages(minilm_task.model):
            x = stage.run(minilm_task.model, x)
        expected = minilm_task.model(inputs)
    assert torch.nn.functional.cosine_similarity(x, expected).min() > 1 - 1e-5


def test_dashboard_folds_sliders_by_block_and_labels_them_by_type(minilm_task):
    from workbench.widgets.dashboard import Dashboard
    dashboard = Dashboard(minilm_task, synchronous=True, reference=False)
    folds = dashboard.children[0].children[0]
    assert folds.titles == tuple(f"block {b}" for b in range(6))
    assert [s.description.split()[0] for s in folds.children[0].children] == list(minilm.LAYER_TYPES)
    state = dashboard.set_rank("bert.encoder.layer.4.output.dense", 32)
    assert state["result"]["metric"] < 0.999 and state["result"]["from_stage"] == 5
