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
    assert len(task.eval_inputs) == 360 and len(task.train_inputs) == 1149 and len(task.val_inputs) == 288
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


def test_validation_split_is_held_out_and_the_test_split_is_unchanged():
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from workbench.data import digits_split

    split = digits_split()
    bunch = load_digits()
    *_, y_test = train_test_split(bunch.data, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0)
    assert np.array_equal(split.y_test.numpy(), y_test)  # the test split of before, sample for sample
    train_rows = {tuple(r.tolist()) for r in split.x_train}
    assert sum(tuple(r.tolist()) in train_rows for r in split.x_val) < 5  # digits has a few duplicates
    assert len(split.x_train) + len(split.x_val) + len(split.x_test) == len(bunch.data)
    counts = torch.bincount(split.y_val, minlength=10)
    assert counts.min() >= 27 and counts.max() <= 30  # stratified


def test_models_trained_on_other_data_are_not_reused(tmp_path, monkeypatch):
    from workbench.data import Split
    from workbench.zoo import digits

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    first = wb.load("digits-mlp")
    full = digits.digits_split()
    fewer = Split(full.x_train[:600], full.y_train[:600], full.x_val, full.y_val, full.x_test, full.y_test)
    monkeypatch.setattr(digits, "digits_split", lambda: fewer)
    other = wb.load("digits-mlp")
    assert len(list(tmp_path.glob("digits-mlp-*.safetensors"))) == 2  # a new key, a new training run
    assert not torch.equal(first.model.fc1.weight, other.model.fc1.weight)
    assert cache.data_digest(full.x_train, full.y_train) != cache.data_digest(fewer.x_train, fewer.y_train)


def test_cache_key_changes_with_the_recipe():
    assert cache.recipe_key({"epochs": 40}) != cache.recipe_key({"epochs": 41})
    assert cache.recipe_key({"a": 1, "b": 2}) == cache.recipe_key({"b": 2, "a": 1})


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(WorkbenchError, match="unknown model 'digits-xyz'.*digits-mlp"):
        wb.load("digits-xyz")
