"""MiniLM's calibration sets: the default is unchanged, "extended" is opt-in, topics stay disjoint
from the evaluation topics, and the token-row augmentation replaces only ordinary tokens."""
import argparse

import pytest
import torch

import workbench as wb
from workbench.cli import main
from workbench.cli.model_source import load_task
from workbench.errors import WorkbenchError
from workbench.zoo import minilm

# Word stems of the evaluation topics and their near neighbours: no extended topic may be about them.
NEAR_EVALUATION = ("astro", "space", "planet", "medic", "health", "anatom", "music", "song", "law", "court", "crime",
                   "legal", "sea", "sail", "ship", "pirate", "support", "helpdesk", "architect", "building", "animal",
                   "wildlife", "nature", "chemi", "lab", "election", "politic", "vot")


def test_extended_topics_are_new_and_disjoint_from_the_evaluation_topics():
    data = minilm.sentences()
    default, evaluation = data["calibration"], data["evaluation"]
    extended = minilm.calibration_topics("extended")
    added = {t: s for t, s in extended.items() if t not in default}
    assert len(added) == 80 and sum(map(len, added.values())) == 2000
    assert not set(extended) & set(evaluation)
    assert not [t for t in added for stem in NEAR_EVALUATION if stem in t]
    texts = minilm.flat(added)
    assert len(set(texts)) == len(texts)
    assert not set(texts) & set(minilm.flat(default))
    assert not set(minilm.flat(extended)) & set(minilm.flat(evaluation))
    assert minilm.calibration_topics("default") == default


def test_default_load_is_unchanged_and_extended_is_opt_in():
    task, extended = wb.load("minilm"), wb.load("minilm", calibration="extended")
    texts = minilm.flat(minilm.sentences()["calibration"])
    assert task.extras["calibration_set"] == "default" and len(task.train_inputs) == len(texts) == 727
    assert torch.equal(task.train_inputs, minilm.pack_calibration(texts)[0])
    assert extended.extras["calibration_set"] == "extended" and len(extended.train_inputs) == 2727
    assert set(texts) < set(extended.extras["calibration_sentences"])
    assert extended.model is task.model and torch.equal(extended.eval_targets, task.eval_targets)
    assert extended.extras["sentences"] == task.extras["sentences"]


@pytest.mark.parametrize("source, options, message", [
    ("minilm", {"calibration": "large"}, "calibration='large' is not a MiniLM calibration set; choose one of "
                                         "'default', 'extended'"),
    ("minilm", {"calibrate": "extended"}, "the embedded model 'minilm' takes only calibration"),
    ("digits-mlp", {"calibration": "extended"}, "the embedded model 'digits-mlp' takes none"),
])
def test_unknown_calibration_options_are_refused(source, options, message):
    with pytest.raises(WorkbenchError, match=message):
        wb.load(source, **options)


def test_augment_rows_replaces_only_ordinary_tokens_by_ordinary_wordpieces():
    rows = minilm.pack_calibration(minilm.flat(minilm.sentences()["calibration"]))[0]
    before = rows.clone()
    noisy = minilm.augment_rows(rows, share=0.15, seed=3)
    assert torch.equal(rows, before)  # input untouched
    assert torch.equal(noisy[:, 1], rows[:, 1])
    special = torch.isin(rows[:, 0], torch.tensor(minilm.tokenizer().all_special_ids))
    changed = noisy[:, 0] != rows[:, 0]
    assert not bool((changed & special).any())
    assert bool((noisy[:, 0][changed] >= minilm.FIRST_WORDPIECE).all())
    share = changed.sum() / (~special).sum()
    assert 0.13 < float(share) < 0.16  # 15% drawn; a draw can repeat the original token
    assert torch.equal(noisy, minilm.augment_rows(rows, share=0.15, seed=3))
    assert not torch.equal(noisy, minilm.augment_rows(rows, share=0.15, seed=4))
    with pytest.raises(WorkbenchError, match="share=1.5 must be in"):
        minilm.augment_rows(rows, share=1.5)


def test_cli_reaches_the_calibration_sets(capsys):
    task = load_task(argparse.Namespace(model="minilm", calibration="extended"))
    assert len(task.train_inputs) == 2727
    assert len(load_task(argparse.Namespace(model="minilm")).train_inputs) == 727
    assert main(["spectra", "digits-mlp", "--calibration", "extended"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --calibration 'extended': 'digits-mlp' has no calibration sets; only the embedded minilm "
        "(your own model's come from --data train_inputs)")
    assert main(["spectra", "minilm", "--calibration", "large"]) == 2
    assert "calibration='large' is not a MiniLM calibration set" in capsys.readouterr().err
