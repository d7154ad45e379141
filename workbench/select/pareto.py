"""Every method measured on one model, the Pareto front, and an advisor that explains its pick.

`collect_points` runs each registered recipe (`workbench.registry.recipes()`) at a few settings,
combinations such as SVD then int8, recovery by distillation, and (optionally) architecture
search results, and measures each result for real: task metric on the test data, stored
parameters, bytes of the saved state_dict, FLOPs and CPU latency (batch 1: median and quartiles of
the timed runs after `LATENCY_WARMUP` untimed ones). A method that fails
on this model is listed in ``skipped`` with its reason rather than hidden.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from workbench.compress import apply
from workbench.errors import WorkbenchError
from workbench.measure import measure
from workbench.registry import get_recipe, recipes
from workbench.zoo.task import Task
from workbench.measure import latency_samples, latency_spread
from workbench.select._allocate import allocate
from workbench.recovery import distill_finetune
from workbench.recovery import train_student
from workbench.measure import count_params

#: Settings tried per recipe; a recipe not listed is tried with no options, then ``ratio=0.5``.
RECIPE_SETTINGS: dict[str, list[dict]] = {
    "svd": [{"ratio": 0.15}, {"ratio": 0.3}, {"ratio": 0.6}, {"energy": 0.9}],
    "prune": [{"ratio": 0.2}, {"ratio": 0.5}, {"ratio": 0.5, "structured": True}],
    "nm": [{"n": 2, "m": 4}, {"n": 4, "m": 8}],
    "quant": [{"bits": 8}, {"bits": 4}, {"bits": 4, "scheme": "kmeans"}, {"bits": 2, "scheme": "kmeans"}],
    "int8": [{}],
    "tucker": [{"ratio": 0.3}, {"ratio": 0.6}],
    "cp": [{"ratio": 0.3}, {"ratio": 0.6}],
    "spatial-svd": [{"ratio": 0.3}, {"ratio": 0.6}],
    "svd_rnn": [{"ratio": 0.5}],
    "fold_bn": [{}],
    "fuse_embedding": [{}],
    "qat": [],  # a QAT plan alone is its PTQ start (the quant points); the training is in `recovery`
}
#: (first recipe, its settings, second recipe, its settings), applied one after the other.
COMBINATIONS: list[tuple[str, dict, str, dict]] = [
    ("svd", {"ratio": 0.3}, "int8", {}),
    ("svd", {"ratio": 0.3}, "quant", {"bits": 4}),
    ("prune", {"ratio": 0.5, "structured": True}, "int8", {}),  # int8 needs dense Linear layers
]


@dataclass
class Point:
    """One measured option. ``metric`` on the test data; ``bytes``: saved state_dict file;
    ``latency_ms``: median CPU time (ms) of one sample over the timed runs after warm-up,
    ``latency_q1_ms`` / ``latency_q3_ms``: their quartiles (the spread; None when not measured);
    ``settings``: how it was made."""

    method: str
    label: str
    metric: float
    params: int
    bytes: int
    flops: int | None = None
    latency_ms: float | None = None
    settings: dict = field(default_factory=dict)
    latency_q1_ms: float | None = None
    latency_q3_ms: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _label(method: str, settings: dict) -> str:
    inner = ", ".join(f"{k}={v}" for k, v in settings.items())
    return f"{method}({inner})" if inner else method


#: untimed runs before a point's latency is timed (caches, allocator, lazy initialisation)
LATENCY_WARMUP = 5


def _point(method: str, label: str, model, task: Task, settings: dict, latency: bool,
           repeats: int = 20) -> Point:
    m = measure(model, task, latency=False)
    spread = {}
    if latency:
        t = latency_spread(latency_samples(model, task.example_input, repeats=repeats, warmup=LATENCY_WARMUP))
        spread = {"latency_ms": t["median_ms"], "latency_q1_ms": t["q1_ms"], "latency_q3_ms": t["q3_ms"]}
    return Point(method, label, float(m["metric"]), int(m["params"]), int(m["bytes"]), int(m["flops"]),
                 settings=settings, **spread)


def _recipe_model(task: Task, model, method: str, settings: dict):
    plan = get_recipe(method)(model, task=task, **settings)
    if not plan.layers and not plan.steps:
        raise WorkbenchError(f"{_label(method, settings)} changes nothing on this model")
    return apply(model, plan, calibration_inputs=task.calibration_inputs())


def collect_points(task: Task, methods: Sequence[str] | None = None, *, combinations: bool = True,
                   allocations: Sequence[float] = (0.15, 0.3),
                   recovery: bool = True, recovery_epochs: int = 3, search_results: Iterable[dict] = (),
                   latency: bool = True, latency_repeats: int = 20,
                   progress: bool = True) -> tuple[list[Point], list[dict]]:
    """Measure every method (default: every registered recipe) on ``task``.

    Returns ``(points, skipped)``; ``skipped`` rows say ``{"label", "reason"}``. The first point
    is the original model. ``recovery``: also an SVD model recovered by distillation and a
    distilled student, when `workbench.recovery` is present. ``search_results``: rows from
    `workbench.select._search.search` (placed as method "search"). ``allocations``: parameter
    budgets at which the greedy SVD allocation is measured too.
    """
    names = list(recipes()) if methods is None else list(methods)
    jobs: list[tuple[str, str, Any]] = [("original", "original", None)]
    for name in names:
        for settings in RECIPE_SETTINGS.get(name, [{}, {"ratio": 0.5}]):
            jobs.append((name, _label(name, settings), ("recipe", name, settings)))
    if combinations:
        for first, s1, second, s2 in COMBINATIONS:
            if first in names and second in names:
                jobs.append((f"{first}+{second}", f"{_label(first, s1)} + {_label(second, s2)}",
                             ("combo", first, s1, second, s2)))
    if allocations and "svd" in names:
        for budget in allocations:
            jobs.append(("svd greedy", f"svd greedy allocation ({budget:.0%} params)", ("allocate", budget)))
    if recovery:
        jobs.append(("svd+distill", f"svd(ratio=0.3) + distill({recovery_epochs} epochs)", ("distill",)))
        jobs.append(("student", f"distilled student ({recovery_epochs * 4} epochs)", ("student",)))
    points: list[Point] = []
    skipped: list[dict] = []
    tried_default: set[str] = set()
    for method, label, job in tqdm(jobs, desc="pareto", disable=not progress, leave=False):
        try:
            if job is None:
                points.append(_point(method, label, task.model, task, {}, latency, latency_repeats))
            elif job[0] == "recipe":
                _, name, settings = job
                if name not in RECIPE_SETTINGS and name in tried_default:
                    continue
                model = _recipe_model(task, task.model, name, settings)
                tried_default.add(name)
                points.append(_point(method, label, model, task, dict(settings), latency, latency_repeats))
            elif job[0] == "combo":
                _, first, s1, second, s2 = job
                model = _recipe_model(task, _recipe_model(task, task.model, first, s1), second, s2)
                points.append(_point(method, label, model, task, {first: s1, second: s2}, latency, latency_repeats))
            elif job[0] == "allocate":

                chosen = allocate(task, job[1], "params", "greedy", progress=False)
                model = apply(task.model, chosen.plan)
                points.append(_point(method, label, model, task, {"budget": job[1], "ranks": chosen.ranks}, latency, latency_repeats))
            elif job[0] == "distill":

                model = _recipe_model(task, task.model, "svd", {"ratio": 0.3})
                recovered = distill_finetune(model, task, epochs=recovery_epochs).model
                points.append(_point(method, label, recovered, task, {"svd": {"ratio": 0.3},
                                                                      "epochs": recovery_epochs}, latency, latency_repeats))
            elif job[0] == "student":

                budget = count_params(task.model) // 5
                student = train_student(task, budget, epochs=recovery_epochs * 4).model
                points.append(_point(method, label, student, task, {"params": budget}, latency, latency_repeats))
        except ImportError as exc:
            skipped.append({"label": label, "reason": f"not available: {exc}"})
        except Exception as exc:  # noqa: BLE001 - a failing method is reported, never hides the others
            skipped.append({"label": label, "reason": f"{type(exc).__name__}: {exc}"})
    for row in search_results:
        points.append(Point("search", f"search {row['label']}", float(row["test"]), int(row["params"]),
                            int(row.get("saved_bytes", row["bytes"])), row.get("flops"),
                            row.get("latency_ms"), {"widths": row["widths"], "family": row["family"]},
                            row.get("latency_q1_ms"), row.get("latency_q3_ms")))
    return points, skipped


def quality(point: Point, higher_is_better: bool = True) -> float:
    """``point.metric`` oriented so that larger is better: the metric itself, or minus it for a
    lower-is-better metric (a perplexity)."""
    return point.metric if higher_is_better else -point.metric


#: The x axes of a Pareto front: name -> `Point` field.
AXES = {"bytes": "bytes", "params": "params", "latency": "latency_ms", "latency_ms": "latency_ms", "flops": "flops"}


def pareto_front(points: Sequence[Point], x: str = "bytes", higher_is_better: bool = True) -> list[Point]:
    """Points no other point beats on both ``x`` (lower is better) and ``metric`` (higher is
    better, or lower with ``higher_is_better=False``: pass ``task.higher_is_better``), sorted by
    ``x``; ``x="latency"`` is ``"latency_ms"``. Points without a value for ``x`` are left out."""
    x = AXES.get(x, x)
    if x not in AXES.values():
        raise WorkbenchError(f"x={x!r} must be one of {', '.join(AXES)} (latency: measured ms per sample)")
    usable = sorted((p for p in points if getattr(p, x) is not None),
                    key=lambda p: (getattr(p, x), -quality(p, higher_is_better)))
    front, best = [], -math.inf
    for p in usable:
        if quality(p, higher_is_better) > best:
            front.append(p)
            best = quality(p, higher_is_better)
    return front


def family_of(point: Point) -> str:
    """The method family of a point: low rank, pruning, structured pruning, quantization,
    combination, distillation, search, or original."""
    method = point.method
    if "+" in method and method != "svd+distill":
        return "combination"
    if method in ("svd", "svd greedy", "tucker", "cp", "spatial-svd", "svd_rnn"):
        return "low rank"
    if method == "prune":
        return "structured pruning" if point.settings.get("structured") else "pruning"
    if method == "nm":
        return "N:M sparsity"
    if method in ("quant", "int8"):
        return "quantization"
    if method in ("svd+distill", "student"):
        return "distillation"
    return method


def family_summary(points: Sequence[Point], within: float = 0.01, higher_is_better: bool = True) -> list[dict]:
    """Per family (`family_of`): how many points, the best one, and the smallest file whose
    metric is within ``within`` of the original's (None if none is): at least the original's
    minus ``within``, or with ``higher_is_better=False`` (a perplexity) at most the original's
    plus ``within``. ``points[0]`` must be the original, as `collect_points` returns them."""
    original = points[0]
    rows = []
    for family in dict.fromkeys(family_of(p) for p in points[1:]):
        members = [p for p in points[1:] if family_of(p) == family]
        best = max(members, key=lambda p: (quality(p, higher_is_better), -p.bytes))
        close = [p for p in members if quality(p, higher_is_better) >= quality(original, higher_is_better) - within]
        smallest = min(close, key=lambda p: p.bytes) if close else None
        rows.append({"family": family, "points": len(members), "best": best.label,
                     "best metric": round(best.metric, 4),
                     "smallest within": smallest.label if smallest else None,
                     "its bytes": smallest.bytes if smallest else None,
                     "of original": round(smallest.bytes / original.bytes, 3) if smallest else None})
    return rows


@dataclass
class Advice:
    """The recommended ``choice`` (None if nothing fits), the ``reason`` in words, and the
    feasible ``candidates`` in the order they were ranked."""

    choice: Point | None
    reason: str
    candidates: list[Point]

    def to_dict(self) -> dict:
        return {"choice": self.choice.to_dict() if self.choice else None, "reason": self.reason,
                "candidates": [p.label for p in self.candidates]}


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} kB"


def advise(points: Sequence[Point], *, max_bytes: int | None = None, max_latency_ms: float | None = None,
           min_metric: float | None = None, metric_name: str = "accuracy",
           higher_is_better: bool = True) -> Advice:
    """Recommend the best measured option under the user's constraint.

    Parameters
    ----------
    points : measured options (`collect_points`).
    max_bytes, max_latency_ms : caps on the saved size (bytes) and the latency (ms per sample).
    min_metric : the quality floor in the metric's direction: the least acceptable metric when
        higher is better (an accuracy of at least this), the greatest when lower is better (a
        perplexity of at most this: a ceiling). The name is kept for both directions.
    metric_name : how the reason names the metric.
    higher_is_better : the metric's direction (pass ``task.higher_is_better``).

    With a size or latency cap: the best option within it (ties: fewer bytes). With only the
    quality floor: the smallest option that reaches it (ties: better metric). The reason names
    the value of each constraint, the runner-up and what it would cost.
    """
    if max_bytes is None and max_latency_ms is None and min_metric is None:
        raise WorkbenchError("give at least one constraint: max_bytes, max_latency_ms or min_metric")
    if not points:
        raise WorkbenchError("no measured points to choose from; run collect_points first")
    original = next((p for p in points if p.method == "original"), None)

    def score(p: Point) -> float:
        return quality(p, higher_is_better)

    def fits(p: Point) -> bool:
        return ((max_bytes is None or p.bytes <= max_bytes)
                and (max_latency_ms is None or (p.latency_ms is not None and p.latency_ms <= max_latency_ms))
                and (min_metric is None or (p.metric >= min_metric if higher_is_better else p.metric <= min_metric)))

    limits = []
    if max_bytes is not None:
        limits.append(f"at most {_kb(max_bytes)}")
    if max_latency_ms is not None:
        limits.append(f"at most {max_latency_ms:.3f} ms per sample")
    if min_metric is not None:
        limits.append(f"{metric_name} {'at least' if higher_is_better else 'at most'} {min_metric:.3f}")
    asked = " and ".join(limits)
    feasible = [p for p in points if fits(p)]
    if not feasible:
        closest = max(points, key=score) if min_metric is not None and max_bytes is None \
            else min(points, key=lambda p: p.bytes)
        return Advice(None, f"No measured option has {asked}. The closest is {closest.label}: "
                            f"{metric_name} {closest.metric:.3f}, {_kb(closest.bytes)}"
                            + (f", {closest.latency_ms:.3f} ms" if closest.latency_ms else "")
                            + ". Relax the constraint or add recovery (fine-tuning / distillation).", [])
    if max_bytes is None and max_latency_ms is None:
        ranked = sorted(feasible, key=lambda p: (p.bytes, -score(p)))
        why = ("the smallest option that keeps the accuracy floor" if higher_is_better else
               f"the smallest option within the {metric_name} ceiling")
    else:
        ranked = sorted(feasible, key=lambda p: (-score(p), p.bytes))
        why = ("the most accurate option within the limit" if higher_is_better else
               f"the option with the lowest {metric_name} within the limit")
    best = ranked[0]
    parts = [f"{best.label} is {why} ({asked}): {metric_name} {best.metric:.3f}, {_kb(best.bytes)}"
             + (f", {best.latency_ms:.3f} ms per sample" if best.latency_ms is not None else "") + "."]
    if original is not None and original is not best:
        parts.append(f"The original is {metric_name} {original.metric:.3f} at {_kb(original.bytes)}: "
                     f"{original.bytes / best.bytes:.1f}x the size, {original.metric - best.metric:+.3f} {metric_name}.")
    if len(ranked) > 1:
        second = ranked[1]
        parts.append(f"Runner-up: {second.label} ({metric_name} {second.metric:.3f}, {_kb(second.bytes)}).")
    on_front = any(best is p for p in pareto_front(points, "bytes", higher_is_better))
    axis = "accuracy" if higher_is_better else metric_name
    parts.append(f"It is on the {axis}-vs-bytes Pareto front." if on_front else
                 f"It is not on the {axis}-vs-bytes front: a smaller, "
                 f"{'more accurate' if higher_is_better else 'better'} option exists but breaks another constraint.")
    parts.append(f"{len(feasible)} of {len(points)} measured options meet the constraint.")
    return Advice(best, " ".join(parts), ranked)
