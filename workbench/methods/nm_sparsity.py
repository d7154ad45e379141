"""``nm``: N:M semi-structured sparsity (2:4, 4:8) of Linear layers into `NMSparseLinear`; recipe "nm".

Settings ``n`` and ``m`` (``1 <= n < m <= 8``): in every group of ``m`` consecutive inputs of each
output row the ``n`` largest-magnitude weights are kept (`workbench.kernels.nm`); ``m`` must
divide the layer's input width. Stored: the kept values and one packed index code per group.

The honest part is speed: on this CPU PyTorch has no N:M kernel (``to_sparse_semi_structured``
is CUDA-only), so the layer expands to a dense weight before its matmul. `nm_latency` measures
the layer against the dense one in the same run (fixed threads, median after warm-up) and
`latency_verdict` says what that means in one sentence.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from workbench.errors import UnsupportedLayerError, WorkbenchError
from workbench.inventory import get_submodule
from workbench.kernels import nm as nm_kernels
from workbench.layers.nm import NMSparseLinear
from workbench.measure import SPEED_THREADS, compare_latency, count_params
from workbench.methods.pruning import speed_note, speed_row
from workbench.methods.units import unit_names, unit_of, unit_table
from workbench.plan import LayerPlan, Plan
from workbench.registry import LayerContext, Method, check_options, register_method, register_recipe

SETTINGS = ("n", "m")


def check_nm_layer(module: nn.Module, params: Mapping[str, Any], name: str) -> None:
    """Refuse unknown settings, ``n >= m``, ``m`` outside 2..8 and an ``m`` not dividing the input width."""
    check_options(f"method 'nm' (layer {name!r})", params, SETTINGS)
    nm_kernels.check_nm(params.get("n", 2), params.get("m", 4), module.in_features, name)


def build_nm(module: nn.Module, params: Mapping[str, Any], context: LayerContext) -> nn.Module:
    """`NMSparseLinear` keeping ``n`` of every ``m`` input weights of ``module`` (unchanged)."""
    check_nm_layer(module, params, context.name)
    return NMSparseLinear.from_linear(module, params.get("n", 2), params.get("m", 4), context.name)


register_method(Method("nm", build_nm, (nn.Linear,), check=check_nm_layer,
                       description="N:M semi-structured sparsity (2:4, 4:8): kept values + packed index codes"))


def nm_plan(model: nn.Module, *, n: int = 2, m: int = 4, layers: Sequence[str] | None = None) -> Plan:
    """Keep ``n`` of every ``m`` consecutive input weights in every ``nn.Linear`` (or ``layers``).

    Every chosen layer's input width must be a multiple of ``m`` (else `WorkbenchError` naming the
    layer, its width and ``m``; nothing is half-applied). A tied group gets one choice on every member.
    """
    nm_kernels.check_nm(n, m)
    units, dense = unit_table(model, kinds=("linear",))
    if layers is None:
        keys = [key for key in units if isinstance(model.get_submodule(key), nn.Linear)]
    else:
        keys = []
        for name in layers:
            module = get_submodule(model, name)
            key = unit_of(units, dense, name)
            if key is None or not isinstance(module, nn.Linear):
                raise UnsupportedLayerError(f"layer {name!r} of type {type(module).__name__} cannot take N:M sparsity; "
                                            f"it handles nn.Linear: {unit_names(units) or '(none in this model)'}")
            keys.append(key)
    if not keys:
        raise WorkbenchError("this model has no nn.Linear layer for N:M sparsity")
    choices = {}
    for key in dict.fromkeys(keys):
        nm_kernels.check_nm(n, m, model.get_submodule(key).in_features, key)
        choices.update(dict.fromkeys(units[key][0], LayerPlan("nm", {"n": n, "m": m})))
    return Plan(choices, left_dense=dense)


# ------------------------------------------------------------------ measured latency


def nm_latency(layer: NMSparseLinear, batch: int = 64, threads: int = SPEED_THREADS, repeats: int = 30,
               warmup: int = 5, seed: int = 0) -> dict:
    """The N:M layer against the dense Linear it stands for, measured in the same run.

    Returns ``{"n", "m", "shape", "batch", "threads", "nm_ms", "dense_ms", "compact_ms",
    "speedup", "verdict"}``: median ms on a random ``(batch, in)`` input at ``threads`` threads
    after ``warmup`` calls (`workbench.measure.compare_latency`). ``compact_ms`` is a dense Linear
    with only ``in * n / m`` inputs: the time an ideal N:M kernel could approach, for reference.
    ``speedup = dense_ms / nm_ms`` (> 1: the N:M layer is faster).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layer.in_features, generator=generator).to(layer.values.device)
    dense, _ = layer.to_masked()
    compact = nn.Linear(layer.in_features * layer.n // layer.m, layer.out_features).to(layer.values.device)
    ms = compare_latency({"nm": layer, "dense": dense}, x, threads, repeats, warmup)
    ms["compact"] = compare_latency({"compact": compact}, x[:, :compact.in_features], threads, repeats, warmup)["compact"]
    row = {"n": layer.n, "m": layer.m, "shape": [layer.out_features, layer.in_features], "batch": batch,
           "threads": threads, "nm_ms": round(ms["nm"], 4), "dense_ms": round(ms["dense"], 4),
           "compact_ms": round(ms["compact"], 4), "speedup": round(ms["dense"] / ms["nm"], 3)}
    row["verdict"] = latency_verdict(row)
    return row


def latency_verdict(row: Mapping[str, Any]) -> str:
    """One sentence on a latency row (`nm_latency`, or summed over layers): faster or slower, by how much, why."""
    ratio = row["nm_ms"] / row["dense_ms"]
    pattern, where = f"{row['n']}:{row['m']}", f"at batch {row['batch']}, {row['threads']} threads"
    if ratio > 1.02:
        head = f"{pattern} is {ratio:.2f}x SLOWER than dense on this CPU ({row['nm_ms']:.3f} vs {row['dense_ms']:.3f} ms {where})"
    elif ratio < 0.98:
        head = f"{pattern} is {1 / ratio:.2f}x faster than dense on this CPU ({row['nm_ms']:.3f} vs {row['dense_ms']:.3f} ms {where})"
    else:
        head = f"{pattern} runs as fast as dense on this CPU ({row['nm_ms']:.3f} vs {row['dense_ms']:.3f} ms {where})"
    return (f"{head}: PyTorch has no CPU kernel for N:M sparsity (torch.sparse.to_sparse_semi_structured is "
            f"CUDA-only), so the layer expands its weights and runs the dense matmul; it saves bytes, not time. "
            f"A dense layer with {row['n']}/{row['m']} of the inputs takes {row['compact_ms']:.3f} ms: "
            f"the most an N:M kernel could gain here.")


def nm_layers(model: nn.Module) -> list[tuple[str, NMSparseLinear]]:
    """``[(name, layer)]`` of every `NMSparseLinear` in ``model`` (a shared one once)."""
    seen, found = set(), []
    for name, module in model.named_modules():
        if isinstance(module, NMSparseLinear) and id(module) not in seen:
            seen.add(id(module))
            found.append((name, module))
    return found


def model_latency(model: nn.Module, batch: int = 64, threads: int = SPEED_THREADS, repeats: int = 10) -> dict:
    """`nm_latency` of every N:M layer summed: ``{"layers": [rows], "n", "m", "nm_ms", "dense_ms",
    "compact_ms", "speedup", "verdict", ...}`` (the pattern of the first layer)."""
    rows = [{"name": name, **nm_latency(layer, batch, threads, repeats, warmup=2)} for name, layer in nm_layers(model)]
    if not rows:
        raise WorkbenchError("the model holds no NMSparseLinear layer")
    total = {key: round(sum(r[key] for r in rows), 4) for key in ("nm_ms", "dense_ms", "compact_ms")}
    summary = {"n": rows[0]["n"], "m": rows[0]["m"], "batch": batch, "threads": threads, **total,
               "speedup": round(total["dense_ms"] / total["nm_ms"], 3), "layers": rows}
    summary["verdict"] = f"summed over {len(rows)} layers, " + latency_verdict(summary)
    return summary


def nm_report(original: nn.Module, compressed: nn.Module, task=None) -> dict:
    """``{"notes", "speed", "nm_latency"}`` for ``compress --json``: whole-model speed-up and per-layer verdicts."""
    result: dict = {"notes": []}
    speed = speed_row(original, compressed, task)
    if speed is not None:
        result["speed"] = speed
        result["notes"].append(speed_note(speed))
    if nm_layers(compressed):
        result["nm_latency"] = model_latency(compressed)
        result["notes"].append(result["nm_latency"]["verdict"])
    kept = count_params(compressed) / max(1, count_params(original))
    result["notes"].append(f"{kept:.1%} of the weights stored (values; plus a few index bits per group)")
    return result


register_recipe("nm", nm_plan, report=nm_report)
