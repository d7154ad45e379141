"""Deterministic training of the small embedded models."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Recipe:
    """Hyperparameters of a training run; hashed into the cache key."""

    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe,
                     desc: str = "training") -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy, minibatches shuffled by ``recipe.seed``.

    ``x: (n, ...)`` inputs, ``y: (n,)`` class labels. Returns the model in eval mode.
    """
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in tqdm(range(recipe.epochs), desc=desc, leave=False):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            optimizer.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            optimizer.step()
        schedule.step()
    return model.eval()
