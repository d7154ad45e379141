"""Per-layer sensitivity: the task metric when ONE layer is compressed and all others stay intact.

Distiller-style analysis: for every compressible layer and every setting of a grid (kept ratio
for SVD / pruning, bit width for quantization), the recipe named by ``method`` builds a plan for
that layer alone; the plan is applied (the user's model is never touched) and scored. Costs of
each option (stored weights, payload bytes, FLOPs of one sample) are measured on the same
compressed model, so the allocators in `workbench.select._allocate` can budget with them.

Scores are computed on a *selection* split: ``split="validation"`` (default) is the task's
held-out validation split (``Task.val_inputs``: the digits models never trained on it), or, for a
task without one, samples of the training split; either way choosing ranks never looks
at the test data. ``split="test"`` uses the task's evaluation data. Results are cached in memory (and on disk with ``cache_dir``), keyed by
the model's weights, the method, the grid and the split.
"""
from __future__ import annotations

import hashlib
import json
import math
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from workbench.hooks import collect_layer_inputs
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.measure import count_flops, count_params
from workbench.plan import LayerPlan, Plan
from workbench.registry import get_recipe
from workbench.zoo.task import Task
from workbench.engine import Engine
from workbench.engine.sizing import state_bytes
from workbench.select.sweeps import map_items
from workbench.layers.recurrent import recurrent_layers

#: Which recipe option a grid value sets, per method (others: ``option=`` explicitly).
GRID_OPTION = {"svd": "ratio", "prune": "ratio", "tucker": "ratio", "cp": "ratio",
               "spatial-svd": "ratio", "quant": "bits"}
#: Default grids: kept fraction for ratio methods, bits for quantization.
DEFAULT_GRIDS = {"ratio": (0.05, 0.1, 0.2, 0.3, 0.5, 0.7), "bits": (2, 3, 4, 6, 8)}
VALIDATION_SAMPLES = 720
COSTS = ("params", "bytes", "flops")

_MEMORY_CACHE: dict[str, "SensitivityResult"] = {}


def model_costs(model: nn.Module, example: torch.Tensor, only: str | None = None) -> dict[str, int]:
    """``{"params", "bytes", "flops"}`` of ``model``: stored weights, payload bytes, FLOPs for ``example``
    (``only``: just that one, the others skipped)."""
    measures = {"params": count_params, "bytes": state_bytes, "flops": lambda m: count_flops(m, example)}
    return {name: int(fn(model)) for name, fn in measures.items() if only in (None, name)}


def selection_task(task: Task, split: str = "validation", n: int = VALIDATION_SAMPLES) -> Task:
    """The task scored on the data used to *choose* settings.

    ``"validation"``: the task's held-out validation split (``val_inputs``, never trained on), else
    samples of the training split; at most ``n`` of either, drawn with seed 0 when there are more.
    ``"test"``: the task itself. A task with neither split cannot give a validation split.
    """
    if split == "test":
        return task
    if split != "validation":
        raise WorkbenchError(f"split={split!r} must be 'validation' (the held-out split, or samples of the training split) or 'test'")
    inputs, targets = task.val_inputs, task.val_targets
    if inputs is None or targets is None:
        inputs, targets = task.train_inputs, task.train_targets
    if inputs is None or targets is None:
        raise WorkbenchError(f"task {task.name!r} has no validation or training split to choose settings on; "
                             "use split='test'")
    if len(inputs) > n:
        order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))[:n]
        inputs, targets = inputs[order], targets[order]
    return replace(task, eval_inputs=inputs, eval_targets=targets)


def quality_loss(baseline: float, value: float, higher_is_better: bool = True) -> float:
    """How much worse ``value`` is than ``baseline`` in the metric's direction: ``baseline -
    value`` when higher is better (an accuracy drop), ``value - baseline`` when lower is better
    (a perplexity rise). Positive = worse; NaN stays NaN."""
    return baseline - value if higher_is_better else value - baseline


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of the architecture and every weight byte."""
    digest = hashlib.sha256(repr(model).encode())
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _tensor_digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]


@dataclass
class SensitivityResult:
    """Metric of the model with one layer compressed, for each layer and grid value.

    ``metric[i][j]``: metric with ``layers[i]`` set by ``grid[j]`` (NaN where the recipe refused);
    ``choices[i][j]``: the `LayerPlan` it became (None: the recipe left the layer dense, e.g. a
    rank that would not save weights); ``costs[c][i][j]``: cost ``c`` in ``COSTS`` of that layer
    option (the whole model's cost minus the other layers' dense costs); ``dense[c][i]``: cost of
    the layer left as it is; ``fixed[c]``: cost of everything that is not a candidate layer;
    ``baseline``: metric of the original on the same data; ``higher_is_better``: the metric's
    direction (the task's), so that `drop` is the loss of quality either way.
    """

    method: str
    option: str
    grid: list[float]
    layers: list[str]
    metric: list[list[float]]
    choices: list[list[LayerPlan | None]]
    costs: dict[str, list[list[int]]]
    dense: dict[str, list[int]]
    fixed: dict[str, int]
    baseline: float
    metric_name: str = "accuracy"
    split: str = "validation"
    total: dict[str, int] = field(default_factory=dict)
    higher_is_better: bool = True

    def drop(self, i: int, j: int) -> float:
        """Loss of quality of ``layers[i]`` at ``grid[j]`` (`quality_loss`): ``baseline - metric``
        for an accuracy, ``metric - baseline`` for a perplexity; positive = worse."""
        return quality_loss(self.baseline, self.metric[i][j], self.higher_is_better)

    def drops(self, layer: str) -> list[float]:
        """`drop` along the grid for one layer."""
        curve = self.curve(layer)
        return [quality_loss(self.baseline, v, self.higher_is_better) for v in curve]

    def curve(self, layer: str) -> list[float]:
        """Metric along the grid for one layer."""
        if layer not in self.layers:
            raise WorkbenchError(f"no sensitivity for layer {layer!r}; measured: {', '.join(self.layers)}")
        return self.metric[self.layers.index(layer)]

    def to_dict(self) -> dict:
        return {"method": self.method, "option": self.option, "grid": list(self.grid),
                "layers": list(self.layers), "metric": self.metric,
                "choices": [[c.to_dict() if c is not None else None for c in row] for row in self.choices],
                "costs": self.costs, "dense": self.dense, "fixed": self.fixed, "total": self.total,
                "baseline": self.baseline, "metric_name": self.metric_name, "split": self.split,
                "higher_is_better": self.higher_is_better}

    @classmethod
    def from_dict(cls, data: dict) -> "SensitivityResult":
        choices = [[LayerPlan.from_dict(c) if c is not None else None for c in row] for row in data["choices"]]
        metric = [[float("nan") if v is None else float(v) for v in row] for row in data["metric"]]
        return cls(data["method"], data["option"], list(data["grid"]), list(data["layers"]), metric,
                   choices, data["costs"], data["dense"], data["fixed"], float(data["baseline"]),
                   data.get("metric_name", "accuracy"), data.get("split", "validation"),
                   data.get("total", {}), bool(data.get("higher_is_better", True)))

    def to_frame(self):
        """A tidy `pandas.DataFrame`: one row per (layer, grid value)."""
        import pandas as pd  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

        rows = []
        for i, layer in enumerate(self.layers):
            for j, value in enumerate(self.grid):
                choice = self.choices[i][j]
                rows.append({"layer": layer, self.option: value, "metric": self.metric[i][j],
                             "drop": self.drop(i, j),
                             "choice": choice.to_dict() if choice else "dense",
                             **{c: self.costs[c][i][j] for c in COSTS}})
        return pd.DataFrame(rows)


def _check_grid(grid: Sequence[float], option: str) -> list[float]:
    values = list(grid)
    if not values:
        raise WorkbenchError(f"the {option} grid is empty; give at least one value, e.g. {DEFAULT_GRIDS.get(option, (0.5,))}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise WorkbenchError(f"grid value {v!r} must be a finite number")
        if option == "ratio" and not (0 < v <= 1):
            raise WorkbenchError(f"grid value ratio={v} must be in (0, 1]")
    return values


_ENGINES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def selection_engine(task: Task, split: str = "validation"):
    """The incremental `workbench.engine.Engine` scoring plans on ``selection_task(task, split)``.

    One per model and split in this process (kept while the model lives), so the layers of one
    analysis share its cached activations: a layer's grid re-runs the network only from that
    layer's stage on. In a worker process of an executor each work item builds its own.
    """

    engines = _ENGINES.setdefault(task.model, {})
    scored = selection_task(task, split)
    key = (split, _tensor_digest(scored.eval_inputs), _tensor_digest(scored.eval_targets))
    if key not in engines:
        engines.clear()  # one split at a time per model: bounded memory
        engines[key] = Engine(scored, preview=False, freeze_gc=False)
    return engines[key]


def layer_curve(task: Task, method: str, option: str, layer: str, grid: Sequence[float],
                split: str = "validation") -> dict:
    """One layer's row of a sensitivity analysis (a unit of work for an executor; picklable inputs).

    Returns ``{"metric": [...], "choices": [...], "costs": {c: [...]}}`` along ``grid``. Each plan
    is scored by the incremental engine (`selection_engine`), which gives the same metric and
    costs as applying it and measuring the new model, without rebuilding or re-running the layers
    before ``layer``.
    """
    recipe = get_recipe(method)
    engine = selection_engine(task, split)
    row: dict[str, Any] = {"metric": [], "choices": [], "costs": {c: [] for c in COSTS}}
    seen: dict[Any, dict] = {}
    for value in grid:
        try:
            plan = recipe(task.model, task=task, layers=[layer], **{option: value})
        except WorkbenchError:
            row["metric"].append(float("nan"))
            row["choices"].append(None)
            for c in COSTS:
                row["costs"][c].append(-1)
            continue
        choice = plan.layers.get(layer) if not plan.steps else LayerPlan(method, {option: value})
        key = choice if not plan.steps else (method, option, value)
        if key not in seen:
            seen[key] = engine.evaluate(plan)
        result = seen[key]
        row["metric"].append(float(result["metric"]))
        row["choices"].append(choice)
        for c in COSTS:
            row["costs"][c].append(int(result[c]))
    return row


def _dense_layer_costs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, list[int]]:
    """Each candidate layer's own params, payload bytes and FLOPs (for one sample ``example``)."""
    inputs = collect_layer_inputs(model, names, example)
    result: dict[str, list[int]] = {c: [] for c in COSTS}
    for name in names:
        module = model.get_submodule(name)
        result["params"].append(count_params(module))
        result["bytes"].append(state_bytes(module))
        result["flops"].append(count_flops(module, inputs[name]))
    return result


def sensitivity(task: Task, method: str = "svd", grid: Sequence[float] | None = None, *,
                layers: Sequence[str] | None = None, option: str | None = None,
                split: str = "validation", executor: Any = None, cache_dir: str | Path | None = None,
                progress: bool = True) -> SensitivityResult:
    """Per-layer sensitivity of ``task.model`` to ``method`` along ``grid``.

    Parameters
    ----------
    task : the model with its data and metric (the model is never modified).
    method : a registered recipe (``workbench.registry.recipes()``): "svd", "prune", "quant", ...
    grid : values of the recipe option ``option`` (kept ratio in (0, 1], or bits); default per option.
    layers : layers to analyse (default: every Linear / ungrouped Conv2d).
    split : "validation" (default: the held-out split, or samples of the training split; `selection_task`)
        or "test".
    executor : None (in this process) or anything `workbench.select.sweeps.map_items` accepts
        ("processes", a ``concurrent.futures.Executor``, a ``dask.distributed.Client``).
    cache_dir : also keep results as JSON files here (default: memory only).

    Returns a `SensitivityResult`; costs are measured on the compressed models themselves. Its
    drops are losses of quality in the task's direction, as ``task.higher_is_better`` says: for
    a perplexity, the rise.
    """

    option = option or GRID_OPTION.get(method, "ratio")
    grid = _check_grid(DEFAULT_GRIDS.get(option, (0.5,)) if grid is None else grid, option)
    get_recipe(method)  # unknown method -> WorkbenchError listing the recipes

    offered = [info.name for info in matrix_layers(task.model)]
    names = list(layers) if layers is not None else offered
    allowed = offered + [name for name, _ in recurrent_layers(task.model)]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise WorkbenchError(f"layers {unknown} are not compressible layers of {task.name!r}; "
                             f"choose from: {', '.join(allowed) or '(none)'}")
    if not names:
        raise WorkbenchError(f"model {task.name!r} has no compressible layers (Linear / Conv2d)")
    scored = selection_task(task, split)
    key = hashlib.sha256(json.dumps({
        "model": model_fingerprint(task.model), "method": method, "option": option, "grid": grid,
        "layers": names, "split": split, "data": _tensor_digest(scored.eval_inputs),
        "targets": _tensor_digest(scored.eval_targets), "metric": task.metric_name,
        **({} if task.higher_is_better else {"higher_is_better": False}),  # old cache keys stay valid
    }, sort_keys=True).encode()).hexdigest()[:20]
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    path = Path(cache_dir) / f"sensitivity-{key}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            result = SensitivityResult.from_dict(json.loads(path.read_text()))
            _MEMORY_CACHE[key] = result
            return result
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable cache file is recomputed

    items = [(task, method, option, name, grid, split) for name in names]
    rows = map_items(_layer_curve_item, items, executor=executor, progress=progress,
                     desc=f"sensitivity {method}")
    example = task.example_input
    totals = model_costs(task.model, example)
    dense = _dense_layer_costs(task.model, names, example)
    fixed = {c: totals[c] - sum(dense[c]) for c in COSTS}
    costs = {c: [[(v - totals[c] + dense[c][i]) if v >= 0 else -1 for v in row["costs"][c]]
                 for i, row in enumerate(rows)] for c in COSTS}
    result = SensitivityResult(
        method=method, option=option, grid=grid, layers=names,
        metric=[row["metric"] for row in rows], choices=[row["choices"] for row in rows],
        costs=costs, dense=dense, fixed=fixed, baseline=float(scored.evaluate(task.model)),
        metric_name=task.metric_name, split=split, total=totals, higher_is_better=task.higher_is_better)
    _MEMORY_CACHE[key] = result
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), allow_nan=True))
    return result


def _layer_curve_item(item: tuple) -> dict:
    task, method, option, name, grid, split = item
    return layer_curve(task, method, option, name, grid, split)


def clear_cache() -> None:
    """Forget every in-memory sensitivity result."""
    _MEMORY_CACHE.clear()


def single_layer_plan(result: SensitivityResult, layer: str, index: int) -> Plan:
    """The plan that compressed only ``layer`` at ``grid[index]`` (empty plan where it stayed dense)."""
    choice = result.choices[result.layers.index(layer)][index]
    return Plan({layer: choice} if choice is not None else {})
