"""``python -m workbench bench latency MODEL``: what a slider move costs, engine vs tutorial method.

Simulates ``--moves`` slider moves on the dashboard's own knobs (`workbench.widgets.dashboard.
knobs_for`: a rank per Linear/Conv2d layer, a per-gate rank per GRU/LSTM; a random knob gets a
random value, its top value meaning "dense"; the other knobs keep theirs) and times, per move, in
the same run and on the same evaluation data (``--subset N``: N evenly spaced evaluation samples;
default the task's ``live_subset``: 64 sentences for MiniLM, the full test split for the digits
models):

* ``p50_ms`` / ``p95_ms``: `workbench.engine.Engine.evaluate` (sliced cached factors, forward from
  the changed stage on; metric on the evaluation data plus params, bytes and FLOPs);
* ``naive_p50_ms`` / ``naive_p95_ms``: the tutorial method, as a notebook callback with one slider
  per layer runs it on every move: recompute the SVD of every layer that has a rank from the
  original weights, rebuild each dense ``U_r S_r V_r^T`` (per gate for recurrent weights), write
  them into a copy of the model and run the full forward for the metric;
* ``naive_one_layer_p50_ms``: a kinder baseline: only the moved layer's SVD and dense rebuild,
  written into a copy that keeps the other layers' (``speedup_one_layer`` against it);
* ``render_p95_ms``: the dashboard's figure update for the move (artists updated with
  ``set_data`` and drawn on the Agg canvas, PNG encoded), without the browser round trip
  (`benchmarks/ui_latency.py` measures that).

``speedup = naive_p50_ms / p50_ms``. The three must agree on the metric (they compute the same
truncations; checked on the last move, ``metric_agrees``).
"""
from __future__ import annotations

import copy
import random
import statistics
import time

import torch
from torch import nn

from workbench.adapters import is_transformers_conv1d
from workbench.cli.output import emit
from workbench.engine import Engine
from workbench.errors import WorkbenchError
from workbench.inventory import weight_matrix
from workbench.plan import LayerPlan, Plan
from workbench.zoo import load


def percentile(values: list[float], q: float) -> float:
    """``q``-quantile (0..1) by linear interpolation, as numpy's default."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def dense_truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """The tutorial's step: a fresh SVD of ``matrix: (m, n)`` and the dense ``U_r S_r V_r^T``."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@torch.no_grad()
def write_dense(original: nn.Module, target: nn.Module, choice: LayerPlan | None) -> None:
    """Write ``choice``'s dense truncation of ``original``'s weights into ``target`` (None: restore)."""
    if isinstance(original, (nn.GRU, nn.LSTM)):
        gates = 3 if isinstance(original, nn.GRU) else 4
        for side in ("ih", "hh"):
            weight = getattr(original, f"weight_{side}_l0").detach()
            rank = None if choice is None else choice.params.get(f"rank_{side}")
            if rank is not None:
                blocks = weight.chunk(gates) if choice.params.get("per_gate", True) else (weight,)
                weight = torch.cat([dense_truncation(block, rank) for block in blocks])
            getattr(target, f"weight_{side}_l0").copy_(weight)
        return
    weight = original.weight.detach()
    if choice is not None:
        dense = dense_truncation(weight_matrix(original), choice["rank"])  # (out, in)
        weight = dense.T if is_transformers_conv1d(original) else dense.reshape(weight.shape)
    target.weight.copy_(weight)


def tutorial_move(task, model: nn.Module, plan: Plan) -> float:
    """Every layer with a rank re-truncated from the original weights, then a full evaluation."""
    for name, choice in plan.layers.items():
        write_dense(task.model.get_submodule(name), model.get_submodule(name), choice)
    return task.evaluate(model)


def one_layer_move(task, model: nn.Module, layer: str, choice: LayerPlan | None) -> float:
    """Only the moved layer re-truncated (the others stay as written before), then a full evaluation."""
    write_dense(task.model.get_submodule(layer), model.get_submodule(layer), choice)
    return task.evaluate(model)


def latency(model_name, moves: int = 100, seed: int = 0, render: bool = True,
            max_cache_bytes: int | None = None, subset: int | None = None) -> dict:
    """Timings (ms) of ``moves`` simulated slider moves on ``model_name`` (an embedded model's name,
    or a `workbench.Task` such as ``wb.load(your_model, eval_data=...)``); see the module doc.

    ``subset``: evaluation samples (None: the task's ``live_subset``, else all; 0: all).
    """
    from workbench.widgets.dashboard import Dashboard, knobs_for, timed_render

    if moves < 2:
        raise WorkbenchError(f"--moves={moves} must be at least 2")
    task = load(model_name) if isinstance(model_name, str) else model_name
    model_name = model_name if isinstance(model_name, str) else task.name
    subset = task.live_subset if subset is None else (subset or None)
    options = {} if max_cache_bytes is None else {"max_cache_bytes": max_cache_bytes}
    start = time.perf_counter()
    engine = Engine(task, subset=subset, **options)
    setup_s = time.perf_counter() - start
    task = engine.task  # the naive methods are judged on the same samples
    knobs = knobs_for(task.model)
    if not knobs:
        raise WorkbenchError(f"model {model_name!r} has no layer with a rank to move")
    dashboard = Dashboard(task, engine=engine, synchronous=True) if render else None
    tutorial_model = copy.deepcopy(task.model).eval()
    one_layer_model = copy.deepcopy(task.model).eval()
    rng = random.Random(seed)
    choices: dict[str, LayerPlan] = {}
    ranks = {knob.layer: knob.maximum for knob in knobs}
    timings: dict[str, list[float]] = {"engine": [], "tutorial": [], "one_layer": [], "render": []}
    metrics = {}
    for _ in range(moves):
        knob = rng.choice(knobs)
        ranks[knob.layer] = rng.randint(1, knob.maximum)
        choice = knob.choice(ranks[knob.layer])
        for name in knob.layers:  # a tied group's knob sets every member
            if choice is None:
                choices.pop(name, None)
            else:
                choices[name] = choice
        plan = Plan(dict(choices))
        runs = (("engine", lambda: engine.evaluate(plan)),
                ("tutorial", lambda: tutorial_move(task, tutorial_model, plan)),
                ("one_layer", lambda: one_layer_move(task, one_layer_model, knob.layer, choice)))
        for key, run in runs:
            begin = time.perf_counter()
            metrics[key] = run()
            timings[key].append((time.perf_counter() - begin) * 1e3)
        if dashboard is not None:
            timings["render"].append(timed_render(dashboard, {"ranks": dict(ranks), "plan": plan,
                                                              "result": metrics["engine"]}))
    engine_metric = metrics["engine"]["metric"]
    p50 = statistics.median(timings["engine"])
    out = {"model": model_name, "moves": moves, "threads": torch.get_num_threads(),
           "knobs": len(knobs), "eval_samples": len(task.eval_targets), "engine_setup_s": setup_s,
           "p50_ms": p50, "p95_ms": percentile(timings["engine"], 0.95),
           "naive_p50_ms": statistics.median(timings["tutorial"]),
           "naive_p95_ms": percentile(timings["tutorial"], 0.95),
           "speedup": statistics.median(timings["tutorial"]) / p50,
           "naive_one_layer_p50_ms": statistics.median(timings["one_layer"]),
           "speedup_one_layer": statistics.median(timings["one_layer"]) / p50,
           "metric_agrees": all(abs(engine_metric - metrics[k]) <= _tolerance(task) for k in ("tutorial", "one_layer")),
           "engine": engine.report()}
    if timings["render"]:
        out.update(render_p50_ms=statistics.median(timings["render"]),
                   render_p95_ms=percentile(timings["render"], 0.95))
    return out


def _tolerance(task) -> float:
    """Metric difference allowed between engine and naive: 1.5 samples of accuracy, or 1e-4 of a
    continuous metric (the naive methods run dense float32 products, the engine the factors)."""
    return 1.5 / len(task.eval_targets) if task.metric_name == "accuracy" else 1e-4


def run(args) -> int:
    if args.what != "latency":
        raise WorkbenchError(f"unknown benchmark {args.what!r}; available: latency")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cache = None if args.cache_mb is None else int(args.cache_mb * 2**20)
    result = latency(args.model, moves=args.moves, seed=args.seed, render=not args.no_render,
                     max_cache_bytes=cache, subset=args.subset)
    text = (f"{args.model} ({result['eval_samples']} samples): engine p50 {result['p50_ms']:.2f} ms, p95 {result['p95_ms']:.2f} ms; "
            f"tutorial p50 {result['naive_p50_ms']:.2f} ms (x{result['speedup']:.1f}), one layer "
            f"{result['naive_one_layer_p50_ms']:.2f} ms (x{result['speedup_one_layer']:.1f}); "
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
