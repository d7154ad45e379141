"""The seeds' logistic-regression study, done with held-out data and equal storage.

A multinomial logistic regression (scikit-learn) is fit on iris and on a ``make_classification``
problem; its weight matrix ``W: (classes, features)`` is then compressed to a fraction of its
entries, three ways, each storing at most that many numbers:

- ``low_rank``: truncated SVD at the largest rank ``r`` with ``r (classes + features)`` <= budget
  (None where even rank 1 does not fit);
- ``magnitude``: keep the largest ``|w|``;
- ``convex``: L1-ball refit of the training logits with cvxpy, threshold, least squares on the
  support (`workbench.kernels.convex.constrained_prune`).

Accuracy is reported on the training and the held-out test split, before and after.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from sklearn.datasets import load_iris, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from workbench.errors import WorkbenchError
from workbench.kernels import convex
from workbench.kernels import svd as svd_kernels

DATASETS = ("iris", "classification")


def load_problem(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardized ``(x_train, x_test, y_train, y_test)``, 70/30 stratified split, seed 0."""
    if name == "iris":
        x, y = load_iris(return_X_y=True)
    elif name == "classification":
        x, y = make_classification(n_samples=1200, n_features=20, n_informative=8, n_redundant=4,
                                   n_classes=4, n_clusters_per_class=1, random_state=0)
    else:
        raise WorkbenchError(f"dataset={name!r} must be one of {', '.join(DATASETS)}")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    scaler = StandardScaler().fit(x_tr)
    return scaler.transform(x_tr), scaler.transform(x_te), y_tr, y_te


def _accuracy(x: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
    return float(((x @ w.T + b).argmax(1) == y).mean())


def logistic_study(dataset: str = "iris", kept: Sequence[float] = (0.25, 0.5, 0.75)) -> dict:
    """``{"dataset", "shape", "before": {train, test}, "rows": [...]}``; one row per kept fraction
    with ``{"kept", "budget", method: {"stored", "train", "test"} or None}``."""
    x_tr, x_te, y_tr, y_te = load_problem(dataset)
    clf = LogisticRegression(max_iter=2000).fit(x_tr, y_tr)
    w, b = clf.coef_, clf.intercept_
    m, n = w.shape
    xt, wt = torch.from_numpy(x_tr), torch.from_numpy(w)
    yt = xt @ wt.T  # the logits to keep (bias left as it is)
    rows = []
    for fraction in kept:
        if not 0 < fraction <= 1:
            raise WorkbenchError(f"kept fraction {fraction!r} must be in (0, 1]")
        budget = int(math.floor(fraction * m * n))
        row: dict = {"kept": fraction, "budget": budget}
        rank = budget // (m + n)
        if rank >= 1:
            a, c = svd_kernels.truncate(wt, min(rank, min(m, n)))
            low = (a @ c).numpy()
            row["low_rank"] = {"rank": int(min(rank, min(m, n))), "stored": int(min(rank, min(m, n)) * (m + n)),
                               "train": _accuracy(x_tr, y_tr, low, b), "test": _accuracy(x_te, y_te, low, b)}
        else:
            row["low_rank"] = None
        sparsity = 1 - budget / (m * n)
        magnitude = (wt * convex.magnitude_mask(wt, sparsity)).numpy()
        refit = convex.constrained_prune(xt, yt, wt, sparsity).numpy()
        for key, matrix in (("magnitude", magnitude), ("convex", refit)):
            row[key] = {"stored": int((matrix != 0).sum()), "train": _accuracy(x_tr, y_tr, matrix, b),
                        "test": _accuracy(x_te, y_te, matrix, b)}
        rows.append(row)
    return {"dataset": dataset, "shape": [m, n],
            "before": {"train": _accuracy(x_tr, y_tr, w, b), "test": _accuracy(x_te, y_te, w, b)},
            "rows": rows}
