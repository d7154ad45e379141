"""The full study behind the headless report: spectra, sensitivity, allocation, every method,
recovery, and honest measures of the original and the chosen model.

``run_study(task, budget, config) -> Study``. Each stage uses what the workbench has at the time
(`workbench.registry` recipes, `workbench.select`, `workbench.recovery`) and records a stage it
cannot run in ``results["skipped"]`` with the reason, instead of failing the whole report. The
chosen model is the greedy SVD allocation at ``budget`` (fraction of the original's parameters),
recovered by distillation when that improves its validation metric.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench.compress import apply
from workbench.errors import WorkbenchError
from workbench.measure import saved_bytes
from workbench.plan import Plan
from workbench.report import figures
from workbench.spectra import model_spectra
from workbench.select._sensitivity import sensitivity
from workbench.select._allocate import allocate
from workbench.select.pareto import collect_points, pareto_front
from workbench.recovery import distill_finetune
from workbench.export import compare, shipping_measures


@dataclass(frozen=True)
class StudyConfig:
    """What the study runs. The defaults finish in well under 3 minutes for digits-mlp on 2 cores.

    ``by``: budget unit ("params", "bytes", "flops"); ``sensitivity_grid``: kept ratios;
    ``methods``: recipes measured for the Pareto chart (None: every registered recipe;
    ``()``: skip); ``recovery_epochs``: distillation epochs (0: skip); ``large_batch``,
    ``threads``, ``repeats``: latency settings (one intra-op thread by default: on a
    shared machine more threads make small-model timings noisy; ``None`` keeps torch's setting);
    ``onnx``: export and measure ONNX files.
    """

    by: str = "params"
    allocator: str = "greedy"
    sensitivity_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
    allocation_grid: tuple[float, ...] | None = None
    methods: tuple[str, ...] | None = None
    recovery_epochs: int = 4
    large_batch: int = 256
    threads: int | None = 1
    repeats: int = 30
    onnx: bool = True
    progress: bool = True

    @classmethod
    def fast(cls, **changes) -> "StudyConfig":
        """A reduced study for tests and smoke runs (a few seconds on digits-mlp)."""
        grid = (0.1, 0.3, 0.6)  # the allocation reuses the (cached) sensitivity of the same grid
        base = cls(sensitivity_grid=grid, allocation_grid=grid, methods=("svd",), recovery_epochs=1,
                   large_batch=64, repeats=5)
        return replace(base, **changes)


@dataclass
class Study:
    """``results``: JSON-ready dict; ``figures``: ``{name: data URI}``; ``model``: the chosen
    compressed model; ``plan``: its plan; ``task``: the task studied."""

    task: object
    results: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    model: nn.Module | None = None
    plan: Plan = field(default_factory=Plan)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _spectra(study: Study, config: StudyConfig) -> None:

    rows = [s.to_dict() for s in model_spectra(study.task.model)]
    study.results["spectra"] = rows


def _sensitivity(study: Study, config: StudyConfig) -> None:

    result = sensitivity(study.task, "svd", config.sensitivity_grid, progress=config.progress)
    study.results["sensitivity"] = {
        "method": result.method, "option": result.option, "grid": result.grid, "baseline": result.baseline,
        "split": result.split, "layers": {name: [_finite(v) for v in result.curve(name)] for name in result.layers}}


def _allocation(study: Study, config: StudyConfig, budget: float) -> None:

    chosen = allocate(study.task, budget, config.by, config.allocator, grid=config.allocation_grid,
                      progress=config.progress)
    study.results["allocation"] = chosen.to_dict()
    study.plan = chosen.plan
    study.model = apply(study.task.model, chosen.plan, calibration_inputs=study.task.calibration_inputs())


def _methods(study: Study, config: StudyConfig) -> None:

    if config.methods == ():
        raise _Skip("methods=() in the configuration")
    points, skipped = collect_points(study.task, None if config.methods is None else list(config.methods),
                                     combinations=config.methods is None, allocations=(), recovery=False,
                                     latency=False, progress=config.progress)
    rows = [p.to_dict() for p in points]
    front = [p.label for p in pareto_front(points, "bytes", study.task.higher_is_better)]
    study.results["methods"] = {"points": rows, "front": front, "skipped": skipped}
    if any(p.latency_ms is not None for p in points):
        study.results["methods"]["front_latency"] = [p.label for p in pareto_front(points, "latency",
                                                                                   study.task.higher_is_better)]


def _recovery(study: Study, config: StudyConfig) -> None:

    if config.recovery_epochs <= 0:
        raise _Skip("recovery_epochs=0 in the configuration")
    if study.model is None:
        raise _Skip("no chosen model (the allocation stage did not run)")
    run = distill_finetune(study.model, study.task, epochs=config.recovery_epochs, progress=config.progress)
    before = study.task.evaluate(study.model)
    after = study.task.evaluate(run.model)
    history = run.history_dict()
    improved = run.best_epoch > 0
    study.results["recovery"] = {"epochs": config.recovery_epochs, "best_epoch": run.best_epoch,
                                 "test_metric_before": before, "test_metric_after": after,
                                 "kept": improved, "history": run.history, "start": run.start,
                                 "validation": history}
    if improved:  # chosen on the validation split, never the test split
        study.model = run.model


def _measures(study: Study, config: StudyConfig) -> None:

    formats = ("pt", "safetensors")
    original = shipping_measures(study.task.model, study.task, config.large_batch, config.threads, formats,
                                 config.repeats)
    study.results["measures"] = {"original": original}
    if study.model is not None:
        chosen = shipping_measures(study.model, study.task, config.large_batch, config.threads, formats,
                                   config.repeats)
        study.results["measures"]["chosen"] = chosen
        study.results["measures"]["compare"] = compare(original, chosen)


class _Skip(Exception):
    """A stage that does not apply to this configuration."""


def run_study(task, budget: float = 0.3, config: StudyConfig | None = None) -> Study:
    """Run every stage on ``task`` (never modified) and return the `Study`.

    Raises `WorkbenchError` for a budget outside (0, 1] or one no allocation can meet (the
    message names the smallest reachable size; nothing is written); another stage that cannot
    run is recorded in ``results["skipped"]`` as ``{"stage", "reason"}``.
    """
    config = config or StudyConfig()
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise WorkbenchError(f"budget={budget!r} must be a fraction in (0, 1] of the original's {config.by}")
    torch.manual_seed(0)
    study = Study(task)
    study.results.update({"model": task.name, "budget": budget, "by": config.by, "metric_name": task.metric_name,
                          "config": {k: v for k, v in config.__dict__.items()}, "skipped": [], "timings_s": {}})
    stages = [("spectra", lambda: _spectra(study, config)),
              ("sensitivity", lambda: _sensitivity(study, config)),
              ("allocation", lambda: _allocation(study, config, budget)),
              ("methods", lambda: _methods(study, config)),
              ("recovery", lambda: _recovery(study, config)),
              ("measures", lambda: _measures(study, config))]
    bar = tqdm(stages, desc="report", disable=not config.progress)
    for name, stage in bar:
        bar.set_postfix_str(name)
        start = time.perf_counter()
        try:
            stage()
        except _Skip as exc:
            study.results["skipped"].append({"stage": name, "reason": str(exc)})
        except WorkbenchError as exc:
            if name == "allocation":  # the budget cannot be met: there is no chosen model to report
                raise
            study.results["skipped"].append({"stage": name, "reason": f"WorkbenchError: {exc}"})
        except ImportError as exc:
            study.results["skipped"].append({"stage": name, "reason": f"not available: {exc}"})
        except Exception as exc:  # noqa: BLE001 - one failing stage is reported, the report still comes
            study.results["skipped"].append({"stage": name, "reason": f"{type(exc).__name__}: {exc}"})
        study.results["timings_s"][name] = round(time.perf_counter() - start, 2)
    if study.model is not None:
        study.results["chosen_point"] = {"bytes": saved_bytes(study.model), "metric": task.evaluate(study.model)}
    study.results["plan"] = study.plan.to_dict()
    study.figures = figures_from_results(study.results)
    return study


def figures_from_results(results: dict) -> dict:
    """``{name: data URI}`` of every figure the results allow (the page can be redrawn from
    ``results.json`` alone)."""
    metric = results.get("metric_name", "metric")
    out = {}
    if "spectra" in results:
        out["spectra"] = figures.spectra_figure(results["spectra"])
    sens = results.get("sensitivity")
    if sens:
        out["sensitivity"] = figures.sensitivity_figure(sens["grid"], sens["layers"], sens["baseline"],
                                                        sens["option"], metric)
    if "methods" in results:
        out["pareto"] = figures.pareto_figure(results["methods"]["points"], results["methods"]["front"],
                                              results.get("chosen_point"), metric)
        if "front_latency" in results["methods"]:
            out["pareto_latency"] = figures.pareto_figure(results["methods"]["points"],
                                                          results["methods"]["front_latency"],
                                                          results.get("chosen_point"), metric, x="latency")
    rec = results.get("recovery")
    if rec:
        out["recovery"] = figures.recovery_figure(rec["history"], rec["start"], metric)
    measures = results.get("measures", {})
    if "chosen" in measures:
        pair = [measures["original"], measures["chosen"]]
        out["measures"] = figures.measures_figure(["original", "chosen"], [m["latency"]["large_ms"] for m in pair],
                                                  [m["disk"]["safetensors"] / 1024 for m in pair])
    return {name: figures.to_data_uri(fig) for name, fig in out.items()}
