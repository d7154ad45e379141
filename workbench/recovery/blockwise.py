"""Block-wise reconstruction: tune a compressed model stage by stage to reproduce the original's outputs.

One-shot and sequential calibration fit each compressed LAYER to its own outputs. The errors of a
block's layers still interact (attention scores mix q and k; the FFN's GELU sits between its two
layers), and no layer-wise fit sees that. Block-wise reconstruction (BRECQ, Li et al. 2021;
the block-wise distillation step of compressed-LLM practice) instead trains, for each stage of the
model in forward order, what the compression left trainable in that stage, so that

    stage_student(x') ~ stage_original(x)        (mean squared error over the stage's outputs)

where ``x'`` is the stage's input in the student whose EARLIER stages are already tuned and ``x``
the original model's. Each stage is one small regression on cached activations: no labels, no
end-to-end backpropagation, memory of one stage. A share of the calibration inputs is held out;
each stage keeps the epoch with the lowest held-out loss (the starting point counts as epoch 0),
so tuning never leaves a stage worse on data it did not train on.

Only what the compression changed trains by default (low-rank factors; kept weights of pruned
layers under their masks; quantized weights through their straight-through view on their PTQ
steps, which stay fixed, as in plain fine-tuning), via the same
training views as fine-tuning (`workbench.recovery.views`); the result is re-packed into compact
storage, as small as before. Stages come from `workbench.auto_stages.find_stages`, checked on the
first calibration inputs (MiniLM: its declared six encoder blocks; a Sequential: one stage per layer
with its activation; a user's BERT / GPT-2 / Llama or residual network: the layers before its list
of blocks, each block, the layers after it; any other model: one stage, i.e. whole-model output
matching). The compressed model's stages and the original's must agree in number and labels;
they are paired in order. A stage's output is compared by the tensors it computed
(`workbench.auto_stages.compared_tensors`: between automatic stages the hidden state, at the end
the model output's floating tensors that the stage did not pass through unchanged). A layer that
belongs to no automatic stage (a head tied to the embeddings) is not tuned.

What it optimizes is output FIDELITY (mean squared error to the original's activations), the
metric of an encoder such as MiniLM. A classifier's accuracy is better served by end-to-end
distillation with labels and softened logits (`workbench.recovery.distill_finetune`): on the
digits MLP block-wise tuning lowers the output error but not the misclassifications.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.auto_stages import compared_tensors, find_stages
from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError
from workbench.recovery import views
from workbench.recovery.finetune import SCALE_LR, check_epochs, check_lr_and_batch
from workbench.recovery.lsq import QuantView, set_learn_scales

TRAIN_CHOICES = ("compressed", "all")
EXAMPLE = 2  # calibration samples the automatic stage cut is checked on


@dataclass
class BlockwiseResult:
    """``model``: the tuned, re-packed copy. ``stages``: one dict per stage with ``stage`` (label),
    ``parameters`` (trained), ``start_loss``/``best_loss`` (held-out MSE before/after), ``best_epoch``
    (0: the untuned stage was kept) and ``seconds``."""

    model: nn.Module
    stages: list[dict] = field(default_factory=list)


def stage_outputs(output: Any, stage_input: Any) -> list[torch.Tensor]:
    """The floating tensors a stage computed: the `compared_tensors` of ``output`` that are not
    passed through unchanged from ``stage_input`` (MiniLM's blocks hand on their attention mask as
    it came; the last automatic stage hands on the last block's hidden state)."""
    passed = {id(t) for t in compared_tensors(stage_input)}
    return [t for t in compared_tensors(output) if id(t) not in passed]


def paired_stages(work: nn.Module, original: nn.Module, example: Any) -> list[tuple]:
    """``[(stage of work, stage of original)]``, in order, found on ``example``; raises
    `WorkbenchError` when the two models' stages differ in number or labels."""
    found, reference = find_stages(work, example), find_stages(original, example)
    labels = [s.label for s in found.stages]
    if labels != [s.label for s in reference.stages]:
        raise WorkbenchError(f"the compressed model's stages {labels} ({found.why}) differ from the original's "
                             f"{[s.label for s in reference.stages]} ({reference.why}); block-wise tuning needs "
                             f"models with the same stages")
    return list(zip(found.stages, reference.stages))


def state_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the stage's computed tensors of their mean squared error (`stage_outputs` lists)."""
    if not student or len(student) != len(teacher):
        raise WorkbenchError(f"a stage computed {len(student)} floating-point tensor(s) against the original's "
                             f"{len(teacher)}; block-wise tuning needs at least one, matching in number")
    return sum(torch.nn.functional.mse_loss(s, t.detach()) for s, t in zip(student, teacher)) / len(student)


def _trainable_parameters(stage, work: nn.Module, original: nn.Module, train: str,
                          frozen: set[int]) -> list[nn.Parameter]:
    """Parameters of ``stage`` to tune: those the compression changed (or all), never one the
    training views froze (``frozen``: ids, e.g. the quantization steps)."""
    before = {name: p.shape for name, p in original.named_parameters()}
    chosen = []
    for name, p in work.named_parameters():
        if not stage.owns(name) or id(p) in frozen:
            continue
        if train == "all" or before.get(name) != p.shape:
            chosen.append(p)
    return chosen


def _check(epochs: int, lr: float, batch_size: int, holdout: float, train: str, n: int) -> None:
    check_epochs(epochs)
    check_lr_and_batch(lr, batch_size)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 < holdout < 1:
        raise WorkbenchError(f"holdout={holdout!r} must be a fraction in (0, 1) of the calibration inputs")
    if train not in TRAIN_CHOICES:
        raise WorkbenchError(f"train={train!r}; choose one of {TRAIN_CHOICES} (compressed layers only, or every "
                             f"parameter of the stage)")
    if n < 4:
        raise WorkbenchError(f"block-wise tuning needs at least 4 calibration inputs, got {n}")


def reconstruct_blocks(model: nn.Module, original: nn.Module, calibration_inputs: torch.Tensor, *,
                       epochs: int = 8, lr: float = 3e-4, batch_size: int = 32, holdout: float = 0.15,
                       train: str = "compressed", learn_scales: bool = False, seed: int = 0,
                       progress: bool = True) -> BlockwiseResult:
    """Tune ``model`` (compressed) stage by stage towards ``original``; neither is modified.

    ``calibration_inputs``: ``(n, ...)`` model inputs (MiniLM: token-id rows), split into a fit
    part and a held-out ``holdout`` share (by a seeded permutation) and run in chunks of
    ``batch_size``. Per stage: Adam at ``lr`` with a cosine schedule over ``epochs`` passes.
    ``train``: ``"compressed"`` (what the compression changed) or ``"all"`` (every parameter of
    the stage, norms included). ``learn_scales``: also learn the quantization steps of quantized
    layers (LSQ, at ``SCALE_LR * lr``; stored as before), else they stay at their PTQ values.
    Returns a `BlockwiseResult`; deterministic for a fixed ``seed``.
    """
    _check(epochs, lr, batch_size, holdout, train, len(calibration_inputs))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(calibration_inputs), generator=generator)
    n_val = max(1, round(holdout * len(order)))
    fit_idx, val_idx = order[n_val:].sort().values, order[:n_val].sort().values
    # One list of chunks, on the model's device: the first ``n_fit`` train, the rest are held out.
    calibration_inputs = to_device(calibration_inputs, model_device(model))
    fit_chunks = list(calibration_inputs[fit_idx].split(batch_size))
    student = fit_chunks + list(calibration_inputs[val_idx].split(batch_size))
    teacher, n_fit = list(student), len(fit_chunks)
    was_training = original.training
    work = views.trainable(copy.deepcopy(model)).eval()
    set_learn_scales(work, learn_scales)  # else quantized weights train through the STE on their PTQ steps
    frozen = {id(p) for p in work.parameters() if not p.requires_grad}
    steps = {id(m.scale) for m in work.modules() if isinstance(m, QuantView) and m.scale.requires_grad}
    original.eval()
    log = []
    try:
        pairs = paired_stages(work, original, calibration_inputs[:EXAMPLE])
        bar = tqdm(pairs, desc="block-wise tuning", leave=False, disable=not progress)
        for stage, reference in bar:
            started = time.perf_counter()
            with torch.no_grad():
                teacher_next = [reference.run(original, s) for s in teacher]
            targets = [stage_outputs(o, s) for o, s in zip(teacher_next, teacher)]
            params = _trainable_parameters(stage, work, original, train, frozen)
            entry = {"stage": stage.label, "parameters": sum(p.numel() for p in params)}
            if params:
                entry.update(_tune_stage(stage, work, params, student[:n_fit], targets[:n_fit], student[n_fit:],
                                         targets[n_fit:], epochs, lr, generator, steps))
            with torch.no_grad():
                student = [stage.run(work, s) for s in student]
            teacher = teacher_next
            entry["seconds"] = round(time.perf_counter() - started, 2)
            log.append(entry)
            if "best_loss" in entry:
                bar.set_postfix(stage=stage.label, loss=f"{entry['best_loss']:.3g}")
    finally:
        original.train(was_training)
    for p in work.parameters():
        p.requires_grad_(id(p) not in frozen)
    return BlockwiseResult(model=views.repack(work).eval(), stages=log)


def _loss(stage, work, state, target) -> torch.Tensor:
    return state_mse(stage_outputs(stage.run(work, state), state), target)


def _held_out_loss(stage, work, inputs, targets) -> float:
    """Held-out MSE, weighted by each chunk's rows (the last chunk may be short)."""
    with torch.no_grad():
        total = sum(float(_loss(stage, work, s, t)) * len(t[0]) for s, t in zip(inputs, targets))
        return total / sum(len(t[0]) for t in targets)


def _tune_stage(stage, work, params, inputs, targets, val_inputs, val_targets, epochs, lr, generator,
                steps) -> dict:
    chosen = {id(p) for p in params}
    for p in work.parameters():
        p.requires_grad_(id(p) in chosen)
    groups = [{"params": [p for p in params if id(p) not in steps]},
              {"params": [p for p in params if id(p) in steps], "lr": lr * SCALE_LR}]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(inputs))
    start = best = _held_out_loss(stage, work, val_inputs, val_targets)
    best_epoch, best_values = 0, [p.detach().clone() for p in params]
    for epoch in range(1, epochs + 1):
        for i in torch.randperm(len(inputs), generator=generator).tolist():
            loss = _loss(stage, work, inputs[i], targets[i])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        current = _held_out_loss(stage, work, val_inputs, val_targets)
        if current < best:
            best, best_epoch, best_values = current, epoch, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, value in zip(params, best_values):
            p.copy_(value)
    return {"start_loss": start, "best_loss": best, "best_epoch": best_epoch}
