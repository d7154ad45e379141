"""Datasets the embedded models train and evaluate on (no downloads: scikit-learn ships digits)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SPLIT_SEED = 0
TEST_FRACTION = 0.2
#: Fraction of the non-test samples held out for validation (never trained on).
VALIDATION_FRACTION = 0.2


@dataclass(frozen=True)
class Split:
    """Tensors of one supervised split. ``x: (n, features) float32``, ``y: (n,) int64``.

    ``train``: what the embedded models are trained on; ``val``: held out from training, for
    choosing settings (sensitivity, allocation, early stopping); ``test``: for reporting.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits_split() -> Split:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1], stratified splits with seed 0.

    80/20 into train+validation and test (the test split is the same 360 samples as before the
    validation split existed), then 80/20 of the first part into train and validation.
    ``x: (n, 64)`` row-major 8x8 images; 1149 train, 288 validation and 360 test samples.
    """
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_rest, x_te, y_rest, y_te = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED
    )
    x_tr, x_va, y_tr, y_va = train_test_split(
        x_rest, y_rest, test_size=VALIDATION_FRACTION, stratify=y_rest, random_state=SPLIT_SEED
    )
    return Split(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (x_tr, y_tr, x_va, y_va, x_te, y_te)))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows of ``outputs: (n, classes)`` whose argmax equals ``targets: (n,)``."""
    return float((outputs.argmax(dim=-1) == targets).float().mean())
