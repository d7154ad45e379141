"""Small architecture search: digits MLPs / CNNs of chosen widths trained from scratch under a budget.

A candidate is a family ("mlp" or "cnn") and its widths: the hidden layer sizes of the MLP
(depth = their number), or ``(conv1 channels, conv2 channels, fc width)`` of the CNN (same layout
as the embedded ``digits-cnn``). Every candidate with at most ``max_params`` weights is trained
from scratch (fixed seed) on the training split the embedded models train on, chosen by its
accuracy on the held-out validation split (`workbench.data.digits_split`), and reported with its
test accuracy, so "search a smaller architecture" can be placed on the same chart as the
compression methods. Training runs through `workbench.select.sweeps`, so the candidates of one
round can go to local processes or a Dask cluster.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.data import accuracy, digits_split
from workbench.errors import WorkbenchError
from workbench.measure import count_flops, count_params, latency_ms, saved_bytes
from workbench.engine.sizing import state_bytes
from workbench.zoo.training import Recipe, train_classifier
from workbench.select.sweeps import map_items

FAMILIES = ("mlp", "cnn")
MLP_WIDTHS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
CNN_CHANNELS = (2, 4, 8, 16, 32, 64)
CNN_FC = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Candidate:
    """``family`` "mlp" (``widths`` = hidden sizes) or "cnn" (``widths`` = (c1, c2, fc))."""

    family: str
    widths: tuple[int, ...]

    def build(self) -> nn.Module:
        """A fresh (untrained) model; input ``(n, 64)``, output ``(n, 10)`` logits."""
        if self.family == "mlp":
            layers: list[tuple[str, nn.Module]] = []
            previous = 64
            for i, width in enumerate(self.widths, 1):
                layers += [(f"fc{i}", nn.Linear(previous, width)), (f"act{i}", nn.ReLU())]
                previous = width
            layers.append((f"fc{len(self.widths) + 1}", nn.Linear(previous, 10)))
            return nn.Sequential(OrderedDict(layers))
        if self.family == "cnn":
            c1, c2, fc = self.widths
            return nn.Sequential(OrderedDict([
                ("image", nn.Unflatten(1, (1, 8, 8))),
                ("conv1", nn.Conv2d(1, c1, 3, padding=1)), ("act1", nn.ReLU()),
                ("conv2", nn.Conv2d(c1, c2, 3, padding=1)), ("act2", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(c2 * 16, fc)), ("act3", nn.ReLU()), ("fc2", nn.Linear(fc, 10))]))
        raise WorkbenchError(f"family={self.family!r} must be one of {', '.join(FAMILIES)}")

    @property
    def params(self) -> int:
        return count_params(self.build())

    @property
    def label(self) -> str:
        return f"{self.family} {'-'.join(map(str, self.widths))}"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise WorkbenchError(f"family={family!r} must be one of {', '.join(FAMILIES)}")


def random_candidate(family: str, rng: random.Random, max_depth: int = 3) -> Candidate:
    if family == "mlp":
        return Candidate("mlp", tuple(rng.choice(MLP_WIDTHS) for _ in range(rng.randint(1, max_depth))))
    return Candidate("cnn", (rng.choice(CNN_CHANNELS), rng.choice(CNN_CHANNELS), rng.choice(CNN_FC)))


def mutate(candidate: Candidate, rng: random.Random, max_depth: int = 3) -> Candidate:
    """One step: a width one notch up or down; for the MLP, sometimes a layer added or removed."""
    widths = list(candidate.widths)
    if candidate.family == "mlp":
        move = rng.random()
        if move < 0.15 and len(widths) < max_depth:
            widths.insert(rng.randrange(len(widths) + 1), rng.choice(MLP_WIDTHS))
            return Candidate("mlp", tuple(widths))
        if move < 0.3 and len(widths) > 1:
            widths.pop(rng.randrange(len(widths)))
            return Candidate("mlp", tuple(widths))
        choices = [MLP_WIDTHS] * len(widths)
    else:
        choices = [CNN_CHANNELS, CNN_CHANNELS, CNN_FC]
    i = rng.randrange(len(widths))
    steps = choices[i]
    position = steps.index(widths[i]) if widths[i] in steps else 0
    widths[i] = steps[max(0, min(len(steps) - 1, position + rng.choice((-1, 1))))]
    return Candidate(candidate.family, tuple(widths))


def train_candidate(item: tuple[Candidate, int, int]) -> dict:
    """Train one candidate from scratch (a unit of work for an executor).

    ``item = (candidate, epochs, seed)``. Returns ``{"label", "family", "widths", "params",
    "bytes" (payload), "saved_bytes" (file), "flops", "latency_ms", "validation", "test"}``
    (accuracies in [0, 1]).
    """
    candidate, epochs, seed = item
    split = digits_split()
    torch.manual_seed(seed)
    model = candidate.build()
    train_classifier(model, split.x_train, split.y_train, Recipe(epochs=epochs, lr=3e-3, seed=seed),
                     desc=f"training {candidate.label}")
    with torch.no_grad():
        validation = accuracy(model(split.x_val), split.y_val)
        test = accuracy(model(split.x_test), split.y_test)
    return {"label": candidate.label, "family": candidate.family, "widths": list(candidate.widths),
            "params": count_params(model), "bytes": state_bytes(model), "saved_bytes": saved_bytes(model),
            "flops": count_flops(model, split.x_test[:1]),
            "latency_ms": latency_ms(model, split.x_test[:1], repeats=20),
            "validation": validation, "test": test}


def _feasible(family: str, rng: random.Random, max_params: int, tries: int = 2000) -> Candidate:
    for _ in range(tries):
        candidate = random_candidate(family, rng)
        if candidate.params <= max_params:
            return candidate
    smallest = Candidate("mlp", (MLP_WIDTHS[0],)) if family == "mlp" else \
        Candidate("cnn", (CNN_CHANNELS[0], CNN_CHANNELS[0], CNN_FC[0]))
    raise WorkbenchError(f"max_params={max_params} is below the smallest {family} in the search space "
                         f"({smallest.label}: {smallest.params} params)")


def search(family: str = "mlp", max_params: int = 25_000, *, strategy: str = "evolution",
           population: int = 6, generations: int = 2, epochs: int = 20, seed: int = 0,
           executor: Any = None, progress: bool = True) -> list[dict]:
    """Search ``family`` architectures with at most ``max_params`` weights.

    ``strategy``: "random" (``population * (generations + 1)`` random candidates) or
    "evolution" (a random population, then each generation mutates the better half).
    Returns every trained candidate, best validation accuracy first (ties: fewer params).
    """
    _check_family(family)
    if strategy not in ("random", "evolution"):
        raise WorkbenchError(f"strategy={strategy!r} must be 'random' or 'evolution'")
    if population < 1 or generations < 0 or epochs < 1:
        raise WorkbenchError(f"population={population}, generations={generations}, epochs={epochs}: "
                             "need population >= 1, generations >= 0, epochs >= 1")

    rng = random.Random(seed)
    results: dict[Candidate, dict] = {}

    def evaluate(candidates: Sequence[Candidate]) -> None:
        fresh = list(dict.fromkeys(c for c in candidates if c not in results))
        rows = map_items(train_candidate, [(c, epochs, seed) for c in fresh], executor=executor,
                         progress=False)
        results.update(zip(fresh, rows))

    rounds = range(generations + 1)
    for generation in tqdm(rounds, desc=f"search {family}", disable=not progress, leave=False):
        if strategy == "random" or generation == 0:
            batch = [_feasible(family, rng, max_params) for _ in range(population)]
        else:
            ranked = sorted(results, key=lambda c: (-results[c]["validation"], results[c]["params"]))
            parents = ranked[:max(1, population // 2)]
            batch = []
            for i in range(population):
                child = mutate(parents[i % len(parents)], rng)
                for _ in range(20):
                    if child.params <= max_params and child not in results:
                        break
                    child = mutate(parents[i % len(parents)], rng)
                if child.params <= max_params:
                    batch.append(child)
        evaluate(batch)
    return sorted(results.values(), key=lambda r: (-r["validation"], r["params"]))
