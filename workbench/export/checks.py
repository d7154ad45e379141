"""Checks that a transformed model is still the same model, with the numbers that show it.

* ``timing``: latency as a median of repeats after a warm-up, with its spread (quartiles);
  ``interleaved_timings``: the same for several models, measured in alternating slices.
* ``fold_bn_check``: fold BatchNorm into the layers before it (the ``fold_bn`` recipe) and compare
  outputs (max abs difference), parameters, BatchNorm count and measured latency.
* ``export_round_trip``: a compressed model written as safetensors and read back, written as ONNX
  and run by onnxruntime; outputs compared with the model in memory, and the file sizes measured
  beside those of the dense model written the same way.

Every number is measured on real files and real runs. Inputs are never modified.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from workbench.compress import apply
from workbench.errors import WorkbenchError
from workbench.export.files import check_writable_dir, load_compressed, save_compressed
from workbench.export.onnx_format import export_onnx, onnx_max_error
from workbench.measure import count_params, latency_samples, latency_spread
from workbench.methods.tensor import bn_fold_analysis, fold_bn_plan
from workbench.plan import Plan


def timing(model: nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 5) -> dict:
    """``{"median_ms", "q1_ms", "q3_ms", "min_ms", "repeats"}`` of ``model(example)`` wall times.

    ``q1_ms`` / ``q3_ms``: first and third quartiles of the ``repeats`` samples (the spread).
    """
    return _summary(latency_samples(model, example, repeats=repeats, warmup=warmup))


def interleaved_timings(models: dict[str, nn.Module], example: torch.Tensor, repeats: int = 30,
                        warmup: int = 5, rounds: int = 5) -> dict[str, dict]:
    """`timing` of each model, measured in ``rounds`` alternating slices of ``repeats / rounds`` runs
    so that a slow spell of the machine falls on every model alike: ``{label: timing dict}``."""
    if rounds < 1 or repeats < rounds:
        raise WorkbenchError(f"repeats={repeats} must be >= rounds={rounds} >= 1")
    samples: dict[str, list[float]] = {label: [] for label in models}
    for r in range(rounds):
        for label, model in models.items():
            samples[label] += latency_samples(model, example, repeats=repeats // rounds, warmup=warmup if r == 0 else 1)
    return {label: _summary(s) for label, s in samples.items()}


def _summary(samples: list[float]) -> dict:
    return {**latency_spread(samples), "min_ms": min(samples), "repeats": len(samples)}


def batchnorm_count(model: nn.Module) -> int:
    """Number of BatchNorm modules in ``model``."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def max_abs_difference(a: nn.Module, b: nn.Module, inputs: torch.Tensor) -> float:
    """``max |a(inputs) - b(inputs)|`` with both models in eval mode (their mode is restored)."""
    modes = a.training, b.training
    try:
        return float((a.eval()(inputs) - b.eval()(inputs)).abs().max())
    finally:
        a.train(modes[0])
        b.train(modes[1])


def fold_bn_check(model: nn.Module, inputs: torch.Tensor) -> dict:
    """Fold every foldable BatchNorm of ``model`` (a copy) and compare on ``inputs`` ``(n, ...)``.

    Returns ``{"model": folded copy, "pairs": [(layer, bn)], "left": {bn: why it stays},
    "max_abs_diff", "params_before", "params_after", "bn_before", "bn_after"}``
    (`workbench.methods.tensor.bn_fold_analysis`). `UnsupportedLayerError` (a `WorkbenchError`)
    when nothing can be folded.
    """
    folded = apply(model, fold_bn_plan(model))
    pairs, left = bn_fold_analysis(model)
    return {"model": folded, "pairs": pairs, "left": left,
            "max_abs_diff": max_abs_difference(model, folded, inputs),
            "params_before": count_params(model), "params_after": count_params(folded),
            "bn_before": batchnorm_count(model), "bn_after": batchnorm_count(folded)}


def export_round_trip(original: nn.Module, plan: Plan, inputs: torch.Tensor, folder: str | os.PathLike,
                      model_name: str, label: str = "model") -> dict:
    """Apply ``plan`` to ``original``, save it as safetensors, load it back, export it to ONNX and
    run that with onnxruntime; ``inputs``: ``(n, ...)``.

    Returns ``{"label", "safetensors_bytes", "load_max_diff" (loaded vs in memory), "onnx_bytes",
    "onnx_max_diff" (onnxruntime vs in memory), "onnx_notes", "dense_onnx_bytes",
    "dense_safetensors_bytes"}``. Files are written in ``folder`` (``<label>.safetensors``,
    ``<label>.onnx``, and ``dense.*`` for the original written the same way). ``model_name``: the
    embedded model's name, so that the file loads back by name.
    """
    folder = check_writable_dir(folder, create=True)
    if not label or os.sep in label:
        raise WorkbenchError(f"label={label!r} must be a non-empty file name without {os.sep!r}")
    model = apply(original, plan)
    example = inputs[:1]
    saved = save_compressed(folder / f"{label}.safetensors", model, plan, model_name, original=original)
    loaded = load_compressed(saved, original=original).model
    onnx = export_onnx(model, example, folder / f"{label}.onnx", exporter="legacy")
    dense_st = save_compressed(folder / "dense.safetensors", original, Plan({}), model_name, original=original)
    dense_onnx = export_onnx(original, example, folder / "dense.onnx", exporter="legacy")
    return {"label": label, "safetensors_bytes": Path(saved).stat().st_size,
            "load_max_diff": max_abs_difference(model, loaded, inputs),
            "onnx_bytes": onnx.bytes, "onnx_max_diff": onnx_max_error(onnx.path, model, inputs),
            "onnx_notes": list(onnx.notes), "dense_onnx_bytes": dense_onnx.bytes,
            "dense_safetensors_bytes": Path(dense_st).stat().st_size}
