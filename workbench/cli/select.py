"""``python -m workbench sensitivity | allocate | pareto MODEL``: choosing, headless, JSON out."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from workbench.cli.model_source import add_model_arguments, load_task
from workbench.cli.output import dumps, emit
from workbench.errors import WorkbenchError


def grid_value(text: str) -> int | float:
    """One ``--grid`` value: an integer literal stays an int (bits, ranks: ``2``, not ``2.0``),
    anything else is a float (kept ratios)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def refusals(task, method: str, result) -> list[list[str | None]]:
    """``reasons[i][j]``: why ``result.metric[i][j]`` is not a number (the recipe's own refusal,
    re-asked for that layer and grid value), or None where it is."""
    from workbench.registry import get_recipe

    recipe = get_recipe(method)
    reasons: list[list[str | None]] = []
    for layer, row in zip(result.layers, result.metric):
        reasons.append([])
        for value, metric in zip(result.grid, row):
            if math.isfinite(metric):
                reasons[-1].append(None)
                continue
            try:
                recipe(task.model, task=task, layers=[layer], **{result.option: value})
            except WorkbenchError as exc:
                reasons[-1].append(str(exc))
            else:
                reasons[-1].append("the metric of the compressed model is not a finite number")
    return reasons


def check_refusals(method: str, result, reasons: list[list[str | None]], named_layers: bool) -> None:
    """Refusals that mean bad input raise a WorkbenchError with the recipe's reason: a layer the
    user named (``--layers``) refused at every grid value, or a grid value refused for every layer.
    Other refusals (a layer of a type the method does not take, a value one layer cannot take)
    stay in the result as nulls with their reasons."""
    if named_layers:
        for layer, row in zip(result.layers, reasons):
            if all(row):
                raise WorkbenchError(f"layer {layer!r} is refused by --method {method}: {row[0]}")
    for j, value in enumerate(result.grid):
        column = [row[j] for row in reasons]
        if all(column):
            raise WorkbenchError(f"--grid {value!r} is refused by --method {method}: {column[0]}")


def run_sensitivity(args) -> int:
    from workbench.select import sensitivity
    from workbench.zoo.cache import cache_dir

    task = load_task(args)
    result = sensitivity(task, args.method, args.grid, layers=args.layers, split=args.split,
                         progress=not args.json, cache_dir=cache_dir() / "sensitivity")
    reasons = refusals(task, args.method, result)
    check_refusals(args.method, result, reasons, named_layers=args.layers is not None)
    data = {"model": args.model, **result.to_dict()}
    if any(any(row) for row in reasons):
        data["metric_errors"] = reasons  # beside each null in ``metric``, the recipe's reason
    width = max(5, *(len(f"{g:g}") for g in result.grid))
    lines = [f"{args.model} {args.method} sensitivity ({result.metric_name} on {result.split}, "
             f"original {result.baseline:.4f}); {result.option}: " + " ".join(f"{g:>{width}g}" for g in result.grid)]
    lines += [f"  {name:>12}: " + " ".join(f"{v:>{width}.3f}" if math.isfinite(v) else f"{'-':>{width}}" for v in row)
              for name, row in zip(result.layers, result.metric)]
    refused = sorted({reason for row in reasons for reason in row if reason})
    lines += [f"  -: refused: {reason}" for reason in refused]
    emit(data, args.json, "\n".join(lines))
    return 0


def run_allocate(args) -> int:
    from workbench.select import allocate

    if args.families is not None:
        return run_joint_allocate(args)
    if args.include_embeddings:
        raise WorkbenchError("--include-embeddings needs --families (the joint allocator)")
    if args.loss == "weighted":
        raise WorkbenchError("--loss weighted needs --families (the joint allocator); the rank allocator takes "
                             "sensitivity or proxy")
    task = load_task(args)
    result = allocate(task, args.budget, args.by, args.allocator or "greedy", method=args.method,
                      loss=args.loss or "sensitivity", progress=not args.json)
    data = {"model": args.model, "metric_name": task.metric_name, "original_metric": task.evaluate(),
            **result.to_dict()}
    text = (f"{args.model} {args.allocator} at {args.budget} of {args.by}: used {result.used:,} of "
            f"{result.total:,} ({result.fraction_used:.1%}); {task.metric_name} {data['original_metric']:.4f} -> "
            f"{result.metric:.4f}; ranks " + ", ".join(f"{k}={v if v is not None else 'dense'}"
                                                    for k, v in result.ranks.items()))
    emit(data, args.json, text)
    return 0


def run_joint_allocate(args) -> int:
    """``allocate --families F1,F2,...``: one option per layer across those families (multiple-choice
    knapsack); the JSON holds ``fraction_used``, ``metric``, ``choices`` and ``plan``."""
    from workbench.select import check_families, joint_allocate

    families = check_families(args.families)  # an unknown family: refused before the model loads
    if args.method != "svd":
        raise WorkbenchError(f"--method {args.method} and --families cannot be combined: --families chooses "
                             "the methods (one family per layer)")
    if args.allocator not in (None, "convex", "greedy"):
        raise WorkbenchError(f"--allocator {args.allocator} does not apply to --families; use convex (default) or greedy")
    task = load_task(args)
    result = joint_allocate(task, args.budget, args.by, families, loss=args.loss or "proxy",
                            relative_to=args.relative_to, allocator=args.allocator or "convex",
                            include_embeddings=args.include_embeddings)
    data = {"model": args.model, "metric_name": task.metric_name, **result}
    picks = ", ".join(f"{name}={c['method']}" + (f"({', '.join(f'{k}={v}' for k, v in c['params'].items())})"
                                                  if c["params"] else "") for name, c in result.choices.items())
    text = (f"{args.model} joint allocation ({','.join(families)}) at {args.budget} of {args.by}: used "
            f"{result.used:,} of {result.total:,} ({result.fraction_used:.1%}); {task.metric_name} "
            f"{result.original_metric:.4f} -> {result.metric:.4f}; {picks}")
    emit(data, args.json, text)
    return 0


def run_pareto(args) -> int:
    from workbench.export import atomic_write, check_writable_dir
    from workbench.registry import get_recipe
    from workbench.select import advise, collect_points, pareto_front

    for method in args.methods or ():
        get_recipe(method)  # an unknown name: WorkbenchError listing the recipes, before any work
    out = check_writable_dir(args.out, create=True)  # before the work, not after it
    task = load_task(args)
    options = {"allocations": ()} if args.no_allocations else {}
    points, skipped = collect_points(task, args.methods, combinations=not args.no_combinations,
                                     recovery=not args.no_recovery, progress=not args.json, **options)
    if not points:
        raise WorkbenchError(f"pareto measured nothing on {args.model!r}")
    front = {p.label for p in pareto_front(points, "bytes", task.higher_is_better)}
    front_latency = {p.label for p in pareto_front(points, "latency_ms", task.higher_is_better)}
    data = {"model": args.model, "metric_name": task.metric_name,
            "points": [{**p.to_dict(), "on_front_bytes": p.label in front,
                        "on_front_latency": p.label in front_latency} for p in points],
            "skipped": skipped}
    constraints = {k: v for k, v in (("max_bytes", args.max_bytes), ("max_latency_ms", args.max_latency_ms),
                                     ("min_metric", args.min_metric)) if v is not None}
    if constraints:
        data["advice"] = advise(points, metric_name=task.metric_name, higher_is_better=task.higher_is_better,
                                **constraints).to_dict()
    atomic_write(out / "pareto.json", lambda tmp: Path(tmp).write_text(dumps(data, indent=2, default=str) + "\n"))
    _save_chart(points, front, front_latency, out, task.metric_name)
    data["files"] = [str(out / name) for name in ("pareto.json", "pareto_bytes.png", "pareto_latency.png")]
    text = "\n".join(f"{'*' if p.label in front else ' '} {p.label:<48} {p.metric:.4f} {p.bytes:>9,} B"
                     for p in points) + f"\nwritten to {out}" + (
                         f"\n{data['advice']['reason']}" if "advice" in data else "")
    emit(data, args.json, text)
    return 0


def _save_chart(points, front, front_latency, out: Path, metric_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from workbench.export import atomic_write
    from workbench.plotting.selection import draw_pareto

    for x, on, name in (("bytes", front, "pareto_bytes.png"), ("latency_ms", front_latency, "pareto_latency.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        usable = [p for p in points if getattr(p, x) is not None]
        spread = ([(p.latency_q1_ms, p.latency_q3_ms) if p.latency_q1_ms is not None else None for p in usable]
                  if x == "latency_ms" else None)
        draw_pareto(ax, [getattr(p, x) for p in usable], [p.metric for p in usable], [p.label for p in usable],
                    [p.method for p in usable], [p.label in on for p in usable], ylabel=metric_name, spread=spread,
                    xlabel="latency (ms, median; bars: quartiles)" if spread else x)
        fig.tight_layout()
        atomic_write(out / name, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)


def _budget(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise WorkbenchError(f"--budget {value!r} must be a number in (0, 1]") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("sensitivity", help="per-layer metric along a grid, one layer at a time")
    add_model_arguments(p)
    p.add_argument("--method", default="svd", help="recipe to vary: svd, prune, quant, ...")
    p.add_argument("--grid", type=grid_value, nargs="+",
                   help="kept ratios (svd/prune) or bits (quant; integers)")
    p.add_argument("--layers", nargs="+", help="restrict to these layers")
    p.add_argument("--split", default="validation", choices=["validation", "test"],
                   help="data scored (validation: the held-out split, or samples of the training split)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_sensitivity)

    p = subparsers.add_parser("allocate", help="per-layer settings under a budget, applied and measured")
    add_model_arguments(p)
    p.add_argument("--budget", type=_budget, required=True, help="fraction of the original kept, e.g. 0.3")
    p.add_argument("--by", default="params", choices=["params", "bytes", "flops"])
    p.add_argument("--allocator", choices=["uniform", "energy", "greedy", "convex"],
                   help="default greedy (convex with --families)")
    p.add_argument("--method", default="svd", help="recipe whose settings are allocated")
    p.add_argument("--families", help="joint mode: comma-separated families to choose from per layer "
                                      "(quant, kmeans, gptq, svd, svd_aware, svd_quant, svd_residual, prune, "
                                      "quant_embedding)")
    p.add_argument("--include-embeddings", action="store_true",
                   help="with --families: also choose for the embedding tables (row-wise b-bit codes)")
    p.add_argument("--relative-to", default="model", choices=["model", "layers"],
                   help="with --families: the budget is a fraction of the whole model or of the candidate layers")
    p.add_argument("--loss", choices=["sensitivity", "proxy", "weighted"],
                   help="predicted loss: measured sensitivity (default), or a proxy (sigma^2 x activation "
                        "energy; with --families, the default: each layer's relative output error); "
                        "weighted (--families only): the proxy scaled by each layer's measured sensitivity")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_allocate)

    p = subparsers.add_parser("pareto", help="every method measured; Pareto charts and JSON in --out")
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="directory for pareto.json and the charts")
    p.add_argument("--max-bytes", type=int, help="advisor: size limit")
    p.add_argument("--max-latency-ms", type=float, help="advisor: latency limit")
    p.add_argument("--min-metric", type=float, help="advisor: accuracy floor")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="recipes to measure (default: every registered one)")
    p.add_argument("--no-combinations", action="store_true", help="skip chained methods (e.g. svd + int8)")
    p.add_argument("--no-allocations", action="store_true", help="skip the greedy SVD allocations (faster)")
    p.add_argument("--no-recovery", action="store_true", help="skip distillation points (faster)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_pareto)
