"""Embedded models: accuracy, determinism, cache behaviour, clear errors."""
import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.zoo import cache
from workbench.zoo.digits import DIGITS_MODELS


@pytest.mark.parametrize("name, floor", [("digits-mlp", 0.95), ("digits-cnn", 0.95), ("digits-resnet", 0.97),
                                         ("digits-gru", 0.93),
                                         ("digits-lstm", 0.93)])
def test_embedded_models_reach_their_accuracy(name, floor):
    task = wb.load(name)
    assert task.metric_name == "accuracy"
    assert len(task.eval_inputs) == 360 and len(task.train_inputs) == 1437
    assert task.evaluate() >= floor


def test_split_is_stratified_and_disjoint():
    from workbench.data import digits_split

    split = digits_split()
    counts = torch.bincount(split.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    train_rows = {tuple(r.tolist()) for r in split.x_train}
    assert sum(tuple(r.tolist()) in train_rows for r in split.x_test) < 5  # digits has a few duplicates


def test_corrupt_cache_is_retrained_not_crashed_on(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    constructor, recipe, _ = DIGITS_MODELS["digits-mlp"]
    first = wb.load("digits-mlp")
    files = list(tmp_path.glob("digits-mlp-*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(b"this is not a safetensors file")
    again = wb.load("digits-mlp")
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)  # retrained deterministically to the same weights
    assert files[0].stat().st_size > 1000


def test_cache_key_changes_with_the_recipe():
    assert cache.recipe_key({"epochs": 40}) != cache.recipe_key({"epochs": 41})
    assert cache.recipe_key({"a": 1, "b": 2}) == cache.recipe_key({"b": 2, "a": 1})


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(WorkbenchError, match="unknown model 'digits-xyz'.*digits-mlp"):
        wb.load("digits-xyz")
