"""One fine-tuning loop for any compressed model (factorized, pruned, quantized), with optional
knowledge distillation, early stopping on a validation split (the task's held-out one, else a part
of the TRAINING split held out: `validation_split`), a progress bar, a per-epoch history and
cancellation.

The loop never touches the model it is given: it trains a deep copy in which each compressed
layer is swapped for its training view (`workbench.recovery.views`), so only what the compression
left free trains (low-rank factors; kept weights under a fixed mask; quantized weights through a
straight-through estimator). After training the views are re-packed into compact storage, so the
result is still really compressed. Cancelling returns the original model object, untouched.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError
from workbench.recovery import views
from workbench.recovery.distill import (Distillation, FeatureMatcher, check_shapes, distillation_loss,
                                        hard_loss)
from workbench.recovery.lsq import QuantView, set_learn_scales

Cancel = threading.Event | Callable[[], bool] | None

#: Models with fewer weights than this train on one CPU thread unless ``threads`` says otherwise.
SMALL_MODEL = 1_000_000


@dataclass
class Recovery:
    """Result of a recovery run.

    Attributes
    ----------
    model : the recovered, re-packed model (on cancel: the very model that was passed in).
    history : one dict per finished epoch: ``epoch`` (1-based), ``loss`` (mean training loss of
        the epoch), ``val_loss`` (hard loss on the validation split), ``metric`` (task metric on
        the validation split), ``seconds`` (wall time of the epoch).
    start : ``{"val_loss", "metric"}`` of the model before training, on the same validation split.
    best_epoch : epoch whose weights were kept (0: none beat the starting point), by the metric
        in the task's direction (``task.higher_is_better``), then the lower ``val_loss``.
    stopped_early : True when ``patience`` epochs passed without a better validation metric.
    cancelled : True when the run was cancelled (``model`` is then the input model).
    untrained_layers : names of compressed layers with no training view (they stayed frozen).
    """

    model: nn.Module
    history: list[dict] = field(default_factory=list)
    start: dict = field(default_factory=dict)
    best_epoch: int = 0
    stopped_early: bool = False
    cancelled: bool = False
    untrained_layers: list[str] = field(default_factory=list)

    def history_dict(self) -> dict:
        """``{"loss": [...], "metric": [...], "val_loss": [...]}`` per epoch, plus run facts (JSON-ready)."""
        return {"loss": [h["loss"] for h in self.history], "metric": [h["metric"] for h in self.history],
                "val_loss": [h["val_loss"] for h in self.history], "start": self.start,
                "best_epoch": self.best_epoch, "stopped_early": self.stopped_early,
                "cancelled": self.cancelled, "untrained_layers": list(self.untrained_layers)}


def check_epochs(epochs: int) -> int:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
        raise WorkbenchError(f"epochs={epochs!r} must be a positive integer (at least 1)")
    return epochs


SCALE_LR = 0.1  # learning rate of LSQ steps relative to the weights' (see `finetune`)


def check_lr_and_batch(lr: float, batch_size: int) -> None:
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise WorkbenchError(f"lr={lr!r} must be a finite number > 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WorkbenchError(f"batch_size={batch_size!r} must be a positive integer")


def _check_options(lr: float, batch_size: int, val_fraction: float, patience: int | None) -> None:
    check_lr_and_batch(lr, batch_size)
    if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction <= 0.5):
        raise WorkbenchError(f"val_fraction={val_fraction!r} must be in (0, 0.5] of the training split")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise WorkbenchError(f"patience={patience!r} must be a positive integer or None (no early stopping)")


def validation_split(x: torch.Tensor, y: torch.Tensor, val_fraction: float = 0.15,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_fit, y_fit, x_val, y_val)``: a seeded random ``val_fraction`` of the TRAINING data held out.

    ``x: (n, ...)``, ``y: (n, ...)``. The test split is never involved.
    """
    n = len(x)
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise WorkbenchError(f"{n} training samples are too few to hold out val_fraction={val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, val = order[n_val:], order[:n_val]
    return x[fit], y[fit], x[val], y[val]


def fit_and_validation(task, val_fraction: float = 0.15, seed: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_fit, y_fit, x_val, y_val)`` for fine-tuning ``task``'s model: the whole training split and
    the task's held-out validation split (``val_inputs``, which the original never trained on)
    where it has one, else `validation_split` of the training data (``val_fraction``, ``seed``)."""
    if getattr(task, "val_inputs", None) is not None and getattr(task, "val_targets", None) is not None:
        return task.train_inputs, task.train_targets, task.val_inputs, task.val_targets
    return validation_split(task.train_inputs, task.train_targets, val_fraction, seed)


def _is_cancelled(cancel: Cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def _select(task) -> Callable[[Any], torch.Tensor]:
    """The task's choice of the judged tensor (`workbench.zoo.task.Task.select`: the logits of a
    ``ModelOutput``, a dict entry, ...); the output itself for a task without one."""
    return getattr(task, "select", None) or (lambda out: out)


def is_causal_lm(task) -> bool:
    """Whether ``task`` trains on next-token prediction: ``task.extras["causal_lm"]``, set by
    `workbench.zoo.user.load_user` for a causal language model whose targets are its token ids."""
    return bool(getattr(task, "extras", {}).get("causal_lm", False))


def quality_key(task, metric: float, val_loss: float) -> tuple[float, float]:
    """Sort key of an epoch, larger is better: the metric in the task's direction
    (``task.higher_is_better``), then the lower validation loss."""
    sign = 1.0 if getattr(task, "higher_is_better", True) else -1.0
    return (sign * metric, -val_loss)


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int = 4096,
             select: Callable[[Any], torch.Tensor] = lambda out: out) -> torch.Tensor:
    return torch.cat([select(model(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def _untrained_layers(model: nn.Module) -> list[str]:
    """Compressed layers left as stored (``stored_weights``) after the views were swapped in: no
    view exists for them (e.g. k-means or asymmetric codes), so their weights stay frozen."""
    return [name for name, module in model.named_modules()
            if hasattr(module, "stored_weights") and not views.is_view(module)]


def finetune(model: nn.Module, task, *, epochs: int, lr: float = 1e-3, batch_size: int = 64,
             distill: Distillation | None = None, learn_scales: bool = False,
             patience: int | None = 5, val_fraction: float = 0.15, weight_decay: float = 0.0,
             seed: int = 0, cancel: Cancel = None, on_epoch: Callable[[dict], bool | None] | None = None,
             progress: bool = True, desc: str = "fine-tuning", threads: int | None = None,
             scale_lr: float = SCALE_LR) -> Recovery:
    """Recover ``model``'s accuracy by training what its compression left trainable.

    Outputs go through ``task.select`` (a ``transformers`` ``ModelOutput`` trains on its logits).
    The training loss is cross-entropy for labels, mean squared error for float targets, and the
    shifted next-token cross-entropy on ``(n, T, V)`` logits for a causal language model, which
    ``task.extras["causal_lm"]`` marks (see `is_causal_lm`).

    Parameters
    ----------
    model : a (compressed) model; never modified. ``task`` supplies ``train_inputs``/``train_targets``
        and the metric; early stopping judges the task's held-out validation split (``val_inputs``)
        where it has one, else ``val_fraction`` of the training data held out (`fit_and_validation`;
        never the test split).
    epochs : maximum number of passes over the fit part of the training split (>= 1).
    lr, batch_size, weight_decay : Adam with a cosine schedule over ``epochs``.
    distill : a `Distillation` (teacher, temperature, alpha, feature pairs) or None (labels only).
    learn_scales : quantized layers also learn their step sizes (LSQ QAT) instead of keeping PTQ's.
    scale_lr : the steps' learning rate as a fraction of ``lr``. Adam normalises every gradient,
        so LSQ's gradient scale does not slow the steps down as it does under SGD; without a
        smaller rate the steps jump by ~``lr`` per batch, a large fraction of their size.
    patience : stop after this many epochs without a better validation metric (None: never);
        the best epoch's weights are kept, and the starting point counts as epoch 0. "Better"
        follows ``task.higher_is_better`` (a perplexity: lower), ties broken by the lower
        validation loss.
    cancel : a ``threading.Event`` (set it to stop) or a callable returning True to stop; checked
        between batches. ``on_epoch(entry)`` is called after each epoch; returning False cancels.
    progress : show a ``tqdm`` bar over epochs.
    threads : torch CPU threads while training (restored afterwards). None: 1 for models under
        `SMALL_MODEL` weights, whose batches of 64 run fastest on one thread (and far faster than
        on two when the cores are shared), else left as it is.

    Returns a `Recovery`. On cancel its ``model`` is the input ``model`` object, as it was.
    """
    check_epochs(epochs)
    _check_options(lr, batch_size, val_fraction, patience)
    if task.train_inputs is None or task.train_targets is None:
        raise WorkbenchError(f"task {task.name!r} has no training split; fine-tuning needs train_inputs/targets")

    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise WorkbenchError(f"threads={threads!r} must be a positive integer or None")
    torch.manual_seed(seed)
    previous_threads = torch.get_num_threads()
    if threads is None and sum(p.numel() for p in model.parameters()) < SMALL_MODEL:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _finetune(model, task, epochs, lr, batch_size, distill, learn_scales, patience, val_fraction,
                         weight_decay, seed, cancel, on_epoch, progress, desc, scale_lr)
    finally:
        torch.set_num_threads(previous_threads)


def _finetune(model, task, epochs, lr, batch_size, distill, learn_scales, patience, val_fraction,
              weight_decay, seed, cancel, on_epoch, progress, desc, scale_lr) -> Recovery:
    x_fit, y_fit, x_val, y_val = fit_and_validation(task, val_fraction, seed)
    work = views.trainable(copy.deepcopy(model))
    # training data on the model's device, once; the metric judges outputs where the data were
    x_fit, y_fit, x_val, y_val_here = to_device((x_fit, y_fit, x_val, y_val), model_device(work))
    set_learn_scales(work, learn_scales)
    result = Recovery(model=model, untrained_layers=_untrained_layers(work))
    select, causal = _select(task), is_causal_lm(task)

    teacher = distill.teacher if distill is not None else None
    teacher_was_training = teacher.training if teacher is not None else False
    matcher = FeatureMatcher(distill.features) if distill is not None and distill.features else None
    progress_bar = None
    try:
        if teacher is not None:
            teacher.eval()
            with torch.no_grad():
                check_shapes(select(work.eval()(x_fit[:2])), select(teacher(x_fit[:2])))
        if matcher is not None:
            matcher.attach(work, teacher)
            with torch.no_grad():
                work(x_fit[:2]), teacher(x_fit[:2])
            matcher.build()
        teacher_fit = None
        if teacher is not None and matcher is None:
            teacher_fit = _outputs(teacher, x_fit, select=select)  # teacher is frozen: its outputs once, not per batch

        def evaluate() -> dict:
            work.eval()
            out = _outputs(work, x_val, select=select)
            return {"val_loss": float(hard_loss(out, y_val_here, causal)),
                    "metric": float(task.metric(to_device(out, y_val.device), y_val))}

        result.start = evaluate()
        best_key = quality_key(task, result.start["metric"], result.start["val_loss"])
        best_state = copy.deepcopy(work.state_dict())
        params = [p for p in work.parameters() if p.requires_grad]
        if matcher is not None:
            params += list(matcher.parameters())
        if not params:
            raise WorkbenchError("the model has nothing trainable left (every layer frozen or packed without a view)")
        steps = {id(m.scale) for m in work.modules() if isinstance(m, QuantView) and m.scale.requires_grad}
        groups = [{"params": [p for p in params if id(p) not in steps]},
                  {"params": [p for p in params if id(p) in steps], "lr": lr * scale_lr, "weight_decay": 0.0}]
        optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        generator = torch.Generator().manual_seed(seed)
        since_best = 0
        bar = progress_bar = tqdm(range(1, epochs + 1), desc=desc, leave=False, disable=not progress)
        for epoch in bar:
            started = time.perf_counter()
            work.train()
            order = torch.randperm(len(x_fit), generator=generator)
            total, seen = 0.0, 0
            for start in range(0, len(x_fit), batch_size):
                if _is_cancelled(cancel):
                    result.cancelled = True
                    return result
                idx = order[start:start + batch_size]
                out = select(work(x_fit[idx]))
                if teacher is None:
                    loss = hard_loss(out, y_fit[idx], causal)
                else:
                    if teacher_fit is not None:
                        t_out = teacher_fit[idx]
                    else:
                        with torch.no_grad():
                            t_out = select(teacher(x_fit[idx]))
                    loss = distillation_loss(out, t_out, y_fit[idx], distill.temperature, distill.alpha, causal)
                    if matcher is not None:
                        loss = loss + distill.feature_weight * matcher.loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
                seen += len(idx)
            schedule.step()
            entry = {"epoch": epoch, "loss": total / seen, **evaluate(),
                     "seconds": time.perf_counter() - started}
            result.history.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", metric=f"{entry['metric']:.4f}")
            key = quality_key(task, entry["metric"], entry["val_loss"])
            if key > best_key:
                best_key, best_state, result.best_epoch, since_best = key, copy.deepcopy(work.state_dict()), epoch, 0
            else:
                since_best += 1
            if on_epoch is not None and on_epoch(dict(entry)) is False:
                result.cancelled = True
                return result
            if _is_cancelled(cancel):
                result.cancelled = True
                return result
            if patience is not None and since_best >= patience:
                result.stopped_early = epoch < epochs
                break
        work.load_state_dict(best_state)
        result.model = views.repack(work).eval()
        return result
    finally:
        if progress_bar is not None:
            progress_bar.close()
        if matcher is not None:
            matcher.detach()
        if teacher is not None:
            teacher.train(teacher_was_training)


def distill_finetune(model: nn.Module, task, *, epochs: int, teacher: nn.Module | None = None,
                     temperature: float = 4.0, alpha: float = 0.9, features: dict | None = None,
                     feature_weight: float = 1.0, **options) -> Recovery:
    """`finetune` with the original model (``task.model`` unless ``teacher`` is given) as teacher.

    ``temperature`` T > 0 softens both distributions; ``alpha`` in [0, 1] weighs the soft loss
    (``1 - alpha`` the labels); ``features``: ``{student layer: teacher layer}`` to match too.
    """
    spec = Distillation(teacher if teacher is not None else task.model, temperature, alpha,
                        dict(features or {}), feature_weight)
    options.setdefault("desc", "distilling")
    return finetune(model, task, epochs=epochs, distill=spec, **options)


def qat(model: nn.Module, task, *, epochs: int, **options: Any) -> Recovery:
    """QAT of an already PTQ-quantized ``model``: fine-tune through the STE with learned steps (LSQ).

    Same options and result as `finetune` (``learn_scales=True``).
    """
    options.setdefault("desc", "QAT")
    return finetune(model, task, epochs=epochs, learn_scales=True, **options)
