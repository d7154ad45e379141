"""``python -m workbench bench latency MODEL``: what a slider move costs, engine vs tutorial method.

Simulates ``--moves`` slider moves (a random compressible layer gets a random rank; the other
layers keep theirs) and times, per move, in the same run, both on the same evaluation data
(``--subset N``: N evenly spaced evaluation samples, cached by the engine; default the task's
``live_subset``: 64 sentences for MiniLM, the full test split for the digits models):

* ``p50_ms`` / ``p95_ms``: `workbench.engine.Engine.evaluate` (sliced cached factors, forward from
  the changed stage on; metric on the evaluation data plus params, bytes and FLOPs);
* ``naive_p50_ms``: the tutorial method: recompute the layer's SVD, rebuild the dense
  ``U_r S_r V_r^T``, write it into a copy of the model and run the full forward for the metric;
* ``render_p95_ms``: the dashboard's figure update for the move (artists updated with
  ``set_data`` and drawn on the Agg canvas, PNG encoded), without the browser round trip
  (`benchmarks/ui_latency.py` measures that).

``speedup = naive_p50_ms / p50_ms``. Both methods must agree on the metric when every moved
layer is rebuilt at the same rank (checked on the last move; ``metric_agrees`` in the output).
"""
from __future__ import annotations

import copy
import random
import statistics
import time

import torch

from workbench.cli.output import emit
from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.plan import LayerPlan, Plan
from workbench.zoo import load


def percentile(values: list[float], q: float) -> float:
    """``q``-quantile (0..1) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@torch.no_grad()
def naive_move(task, model, layer: str, rank: int) -> float:
    """Tutorial-style update: fresh SVD of the original weight, dense rebuild, full evaluation."""
    original = task.model.get_submodule(layer).weight.detach()
    matrix = original.reshape(original.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    dense = (u[:, :rank] * s[:rank]) @ vh[:rank]
    model.get_submodule(layer).weight.copy_(dense.reshape(original.shape))
    return task.evaluate(model)


def latency(model_name: str, moves: int = 100, seed: int = 0, render: bool = True,
            max_cache_bytes: int | None = None, subset: int | None = None) -> dict:
    """Timings (ms) of ``moves`` simulated slider moves on ``model_name``; see the module doc.

    ``subset``: evaluation samples (None: the task's ``live_subset``, else all; 0: all).
    """
    if moves < 2:
        raise WorkbenchError(f"--moves={moves} must be at least 2")
    task = load(model_name)
    subset = task.live_subset if subset is None else (subset or None)
    options = {} if max_cache_bytes is None else {"max_cache_bytes": max_cache_bytes}
    start = time.perf_counter()
    engine = Engine(task, subset=subset, **options)
    setup_s = time.perf_counter() - start
    task = engine.task  # the naive method is judged on the same samples
    layers = list(engine.layers.values())
    if not layers:
        raise WorkbenchError(f"model {model_name!r} has no Linear/Conv2d layer to move a rank on")
    dashboard = None
    if render:
        from workbench.widgets.dashboard import Dashboard, timed_render

        dashboard = Dashboard(task, engine=engine, synchronous=True)
    naive_model = copy.deepcopy(task.model).eval()
    rng = random.Random(seed)
    plan, ranks = Plan({}), {}
    engine_ms, naive_ms, render_ms = [], [], []
    engine_metric = naive_metric = None
    for _ in range(moves):
        info = rng.choice(layers)
        rank = rng.randint(1, min(info.shape))
        ranks[info.name] = rank
        plan = plan.with_layer(info.name, LayerPlan("svd", {"rank": rank}))

        start = time.perf_counter()
        result = engine.evaluate(plan)
        engine_ms.append((time.perf_counter() - start) * 1e3)
        engine_metric = result["metric"]

        start = time.perf_counter()
        naive_metric = naive_move(task, naive_model, info.name, rank)
        naive_ms.append((time.perf_counter() - start) * 1e3)

        if dashboard is not None:
            render_ms.append(timed_render(dashboard, {"ranks": dict(ranks), "plan": plan, "result": result}))
    out = {"model": model_name, "moves": moves, "threads": torch.get_num_threads(),
           "eval_samples": len(task.eval_targets), "engine_setup_s": setup_s,
           "p50_ms": statistics.median(engine_ms), "p95_ms": percentile(engine_ms, 0.95),
           "naive_p50_ms": statistics.median(naive_ms), "naive_p95_ms": percentile(naive_ms, 0.95),
           "speedup": statistics.median(naive_ms) / statistics.median(engine_ms),
           "metric_agrees": abs(engine_metric - naive_metric) <= 1.5 / len(task.eval_targets),
           "engine": engine.report()}
    if render_ms:
        out.update(render_p50_ms=statistics.median(render_ms), render_p95_ms=percentile(render_ms, 0.95))
    return out


def run(args) -> int:
    if args.what != "latency":
        raise WorkbenchError(f"unknown benchmark {args.what!r}; available: latency")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cache = None if args.cache_mb is None else int(args.cache_mb * 2**20)
    result = latency(args.model, moves=args.moves, seed=args.seed, render=not args.no_render,
                     max_cache_bytes=cache, subset=args.subset)
    text = (f"{args.model} ({result['eval_samples']} samples): engine p50 {result['p50_ms']:.2f} ms, p95 {result['p95_ms']:.2f} ms; "
            f"naive p50 {result['naive_p50_ms']:.2f} ms (x{result['speedup']:.1f}); "
            f"render p95 {result.get('render_p95_ms', float('nan')):.1f} ms")
    emit(result, args.json, text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (latency of a slider move)")
    parser.add_argument("what", choices=["latency"], help="which benchmark")
    parser.add_argument("model", help="embedded model name (see `models`)")
    parser.add_argument("--moves", type=int, default=100, help="simulated slider moves (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moves")
    parser.add_argument("--cache-mb", type=float, help="activation cache bound in MiB (default 256)")
    parser.add_argument("--subset", type=int,
                        help="evaluation samples per move, evenly spaced (default: the model's live "
                             "subset, 64 for minilm; the full split for the digits models; 0: all)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-render", action="store_true", help="skip the figure-update timing")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)
