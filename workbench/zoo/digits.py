"""Small models trained on scikit-learn's digits: an MLP, a CNN, a residual CNN and recurrent readers."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from workbench.data import accuracy, digits_split
from workbench.stages import Stage
from workbench.zoo import cache
from workbench.zoo.task import Task
from workbench.zoo.training import Recipe, train_classifier


def digits_mlp() -> nn.Module:
    """64-256-256-10 MLP on flattened 8x8 images. Input ``(n, 64)``, output ``(n, 10)`` logits."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(64, 256)), ("act1", nn.ReLU()),
        ("fc2", nn.Linear(256, 256)), ("act2", nn.ReLU()),
        ("fc3", nn.Linear(256, 10)),
    ]))


def digits_cnn() -> nn.Module:
    """Two 3x3 convs (1->32->64, pooled to 4x4) then two linears. Input ``(n, 64)``."""
    return nn.Sequential(OrderedDict([
        ("image", nn.Unflatten(1, (1, 8, 8))),
        ("conv1", nn.Conv2d(1, 32, 3, padding=1)), ("act1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, 3, padding=1)), ("act2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)), ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * 4 * 4, 128)), ("act3", nn.ReLU()),
        ("fc2", nn.Linear(128, 10)),
    ]))


class ResidualBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; the shortcut is a strided 1x1 conv +
    BatchNorm when the shape changes, else the identity. ``(n, c_in, h, w) -> (n, c_out, h/stride, w/stride)``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)), ("bn", nn.BatchNorm2d(c_out))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def digits_resnet() -> nn.Module:
    """A small ResNet: stem 3x3 conv (32) + BN, two residual blocks (32 at 8x8, 64 at 4x4), global
    average pool, a linear head. Input ``(n, 64)``, output ``(n, 10)`` logits. The residual adds
    couple the stem with block1's second conv (32 channels) and block2's second conv with its
    shortcut conv (64 channels)."""
    return nn.Sequential(OrderedDict([
        ("image", nn.Unflatten(1, (1, 8, 8))),
        ("stem", nn.Conv2d(1, 32, 3, padding=1, bias=False)), ("bn", nn.BatchNorm2d(32)), ("act", nn.ReLU()),
        ("block1", ResidualBlock(32, 32)), ("block2", ResidualBlock(32, 64, stride=2)),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(64, 10)),
    ]))


class RowReader(nn.Module):
    """Reads an 8x8 image as a sequence of 8 rows with a GRU or LSTM; a linear head on the last state.

    Input ``(n, 64)``; the recurrent layer sees ``(n, 8, 8)`` (batch, steps, features).
    """

    def __init__(self, cell: str = "gru", hidden: int = 64):
        super().__init__()
        rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rows = nn.Unflatten(1, (8, 8))
        self.rnn = rnn_cls(input_size=8, hidden_size=hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.rows(x))
        return self.head(out[:, -1])

    def compression_stages(self) -> list[Stage]:
        """``rows``, ``rnn`` (its last step's output), ``head``: the forward pass in three stages."""
        return [Stage("rows"), Stage("rnn", _last_step), Stage("head")]


def _last_step(rnn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rnn(x)[0][:, -1]


DIGITS_MODELS: dict[str, tuple[Callable[[], nn.Module], Recipe, str]] = {
    "digits-mlp": (digits_mlp, Recipe(epochs=40, lr=2e-3),
                   "64-256-256-10 MLP on 8x8 digits"),
    "digits-cnn": (digits_cnn, Recipe(epochs=30, lr=2e-3),
                   "two 3x3 convs (32, 64 channels) + two linears on 8x8 digits"),
    "digits-resnet": (digits_resnet, Recipe(epochs=20, lr=3e-3),
                      "residual CNN with BatchNorm (stem 32, blocks 32 and 64 channels) on 8x8 digits"),
    "digits-gru": (lambda: RowReader("gru"), Recipe(epochs=60, lr=5e-3),
                   "GRU (hidden 64) reading the 8 image rows as 8 steps"),
    "digits-lstm": (lambda: RowReader("lstm"), Recipe(epochs=60, lr=5e-3),
                    "LSTM (hidden 64) reading the 8 image rows as 8 steps"),
}


def build_digits_task(name: str) -> Task:
    """Train (or load from cache) the embedded digits model ``name`` and wrap it in a `Task`.

    The model is trained on the training split only; the validation split (never trained on)
    and the test split are the task's ``val_*`` and ``eval_*``. The cache key holds a digest of
    the training data, so a model trained on other data is never reused.
    """
    constructor, recipe, description = DIGITS_MODELS[name]
    split = digits_split()
    torch.manual_seed(recipe.seed)
    model = constructor()
    key = {"model": name, "architecture": repr(model), **recipe.as_dict(),
           "train_data": cache.data_digest(split.x_train, split.y_train)}
    path = cache.cached_weights_path(name, key)
    if not cache.try_load(model, path):
        train_classifier(model, split.x_train, split.y_train, recipe, desc=f"training {name}")
        cache.store(model, path)
    model.eval()
    return Task(name=name, model=model, eval_inputs=split.x_test, eval_targets=split.y_test,
                metric=accuracy, metric_name="accuracy", train_inputs=split.x_train,
                train_targets=split.y_train, val_inputs=split.x_val, val_targets=split.y_val,
                description=description)
