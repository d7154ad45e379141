"""End-to-end embedding distillation: train a compressed encoder so its outputs point where the original's do.

Block-wise reconstruction (`workbench.recovery.blockwise`) fits each stage to the original's
activations by mean squared error, one stage at a time. Its errors still add up through the
stages, and MSE on hidden states is not the metric of a sentence encoder. This step fine-tunes the
whole compressed model on unlabelled calibration inputs with the metric itself as the loss:

    loss = mean_i (1 - cos(student(x_i), original(x_i)))

over the model's final outputs (MiniLM: the pooled, L2-normalised sentence embeddings that
`workbench.zoo.minilm.mean_cosine` compares). Every parameter the compression left trainable
trains (structurally pruned layers are plain, smaller Linears: all of them; compressed layers
through their training views, `workbench.recovery.views`), in eval mode (no dropout). A seeded
share of the calibration inputs is held out; the epoch with the highest held-out mean cosine is
kept (the starting point counts as epoch 0), so the result is never worse there than the input.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError
from workbench.recovery import views
from workbench.recovery.finetune import check_epochs, check_lr_and_batch
from workbench.recovery.lsq import set_learn_scales


@dataclass
class EmbeddingDistillResult:
    """``model``: the tuned, re-packed copy. ``start``: held-out mean cosine before training.
    ``history``: per epoch ``epoch`` (1-based), ``loss`` (mean training 1 - cos), ``cosine``
    (held-out mean cosine), ``seconds``. ``best_epoch``: the epoch kept (0: the input's weights)."""

    model: nn.Module
    start: float = 0.0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos)`` between the rows of ``student`` and ``teacher`` ``(n, ...)`` (flattened per row)."""
    if student.shape != teacher.shape:
        raise WorkbenchError(f"compressed model outputs {tuple(student.shape)} differ from the original's "
                             f"{tuple(teacher.shape)}; embedding distillation needs the same output shape")
    return (1.0 - F.cosine_similarity(student.flatten(1), teacher.detach().flatten(1), dim=1)).mean()


def _check(epochs: int, lr: float, batch_size: int, holdout: float, n: int) -> None:
    check_epochs(epochs)
    check_lr_and_batch(lr, batch_size)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise WorkbenchError(f"holdout={holdout!r} must be a fraction in (0, 1) of the calibration inputs")
    if n < 4:
        raise WorkbenchError(f"embedding distillation needs at least 4 calibration inputs, got {n}")


@torch.no_grad()
def _outputs(model: nn.Module, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(c) for c in chunks]


def _held_out_cosine(model: nn.Module, chunks: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean over the held-out rows of the cosine to the original's outputs."""
    with torch.no_grad():
        total = sum(float(1.0 - cosine_loss(model(c), t)) * len(c) for c, t in zip(chunks, targets))
    return total / sum(len(c) for c in chunks)


def distill_embeddings(model: nn.Module, original: nn.Module, calibration_inputs: torch.Tensor, *,
                       epochs: int = 3, lr: float = 1e-4, batch_size: int = 32, holdout: float = 0.15,
                       seed: int = 0, progress: bool = True) -> EmbeddingDistillResult:
    """Fine-tune a copy of ``model`` (compressed) end to end towards ``original``'s outputs; neither is modified.

    ``calibration_inputs``: ``(n, ...)`` model inputs (MiniLM: token-id rows ``(n, 2, seq)``), no
    labels; split by a seeded permutation into a fit part and a held-out ``holdout`` share, run in
    chunks of ``batch_size``. Adam at ``lr`` with a cosine schedule over ``epochs`` passes, loss
    `cosine_loss` of the final outputs ``(n, d)``. Deterministic for a fixed ``seed``.
    """
    _check(epochs, lr, batch_size, holdout, len(calibration_inputs))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(calibration_inputs), generator=generator)
    n_val = max(1, round(holdout * len(order)))
    calibration_inputs = to_device(calibration_inputs, model_device(model))
    fit = list(calibration_inputs[order[n_val:].sort().values].split(batch_size))
    val = list(calibration_inputs[order[:n_val].sort().values].split(batch_size))
    was_training = original.training
    original.eval()
    try:
        fit_targets, val_targets = _outputs(original, fit), _outputs(original, val)
    finally:
        original.train(was_training)
    work = views.trainable(copy.deepcopy(model)).eval()
    set_learn_scales(work, False)  # quantized weights train through the STE on their PTQ steps
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise WorkbenchError("the compressed model has no trainable parameters; nothing to distil")
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(fit))
    result = EmbeddingDistillResult(model=work, start=_held_out_cosine(work, val, val_targets))
    best, best_values = result.start, [p.detach().clone() for p in params]
    bar = tqdm(range(1, epochs + 1), desc="embedding distillation", leave=False, disable=not progress)
    for epoch in bar:
        started, total = time.perf_counter(), 0.0
        for i in torch.randperm(len(fit), generator=generator).tolist():
            loss = cosine_loss(work(fit[i]), fit_targets[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(fit[i])
        cosine = _held_out_cosine(work, val, val_targets)
        result.history.append({"epoch": epoch, "loss": total / sum(len(c) for c in fit), "cosine": cosine,
                               "seconds": round(time.perf_counter() - started, 2)})
        bar.set_postfix(loss=f"{result.history[-1]['loss']:.4f}", cosine=f"{cosine:.4f}")
        if cosine > best:
            best, result.best_epoch, best_values = cosine, epoch, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, value in zip(params, best_values):
            p.copy_(value)
    work.zero_grad(set_to_none=True)
    result.model = views.repack(work).eval()
    return result
