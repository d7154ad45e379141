"""Architecture search: budget respected, deterministic, ranked by validation, bad input."""
import random

import pytest

from workbench.errors import WorkbenchError
from workbench.select._search import CNN_CHANNELS, Candidate, mutate, search


def test_candidates_build_with_the_counted_params():
    c = Candidate("mlp", (32, 16))
    assert c.params == 64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
    assert Candidate("cnn", (4, 8, 16)).params == (9 * 4 + 4) + (36 * 8 + 8) + (128 * 16 + 16) + (160 + 10)


def test_mutations_stay_in_the_space():
    rng = random.Random(0)
    c = Candidate("cnn", (8, 8, 16))
    for _ in range(50):
        c = mutate(c, rng)
        assert c.widths[0] in CNN_CHANNELS and len(c.widths) == 3


def test_search_respects_budget_and_is_deterministic():
    first = search("mlp", 6000, population=2, generations=1, epochs=2, progress=False)
    again = search("mlp", 6000, population=2, generations=1, epochs=2, progress=False)
    assert [r["label"] for r in first] == [r["label"] for r in again]
    assert [r["test"] for r in first] == [r["test"] for r in again]
    assert all(r["params"] <= 6000 for r in first)
    assert [r["validation"] for r in first] == sorted((r["validation"] for r in first), reverse=True)


def test_bad_input():
    with pytest.raises(WorkbenchError, match="below the smallest mlp"):
        search("mlp", 100, progress=False)
    with pytest.raises(WorkbenchError, match="family='rnn'"):
        search("rnn", 10_000, progress=False)
    with pytest.raises(WorkbenchError, match="strategy="):
        search("mlp", 10_000, strategy="grid", progress=False)
