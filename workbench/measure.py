"""Measures of any model: parameters, bytes really written, FLOPs, latency (on the model's device), task metric."""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import workbench.flop_formulas  # noqa: F401  (LSTM and int8 kernels counted too)
from workbench.device import model_device, synchronize, to_device
from workbench.errors import WorkbenchError
from workbench.results import Measurement


def count_params(model: nn.Module) -> int:
    """Stored weights: parameters, plus weights kept in buffers by compressed layers.

    A module may define ``stored_weights() -> int`` (packed or sparse layers whose codes live
    in buffers); its subtree is then counted by that method instead. Tied weights count once: a
    parameter shared by several modules (``dec.weight = enc.weight``) and a module registered
    under several names (a tied group compressed as one) are each counted at their first name,
    as ``sum(p.numel() for p in model.parameters())`` counts a plain model.
    """
    total = 0
    counted_prefixes: list[str] = []
    seen: set[int] = set()
    for name, module in model.named_modules():  # yields a module object once
        if any(name.startswith(p) for p in counted_prefixes):
            continue
        if hasattr(module, "stored_weights"):
            total += int(module.stored_weights())
            counted_prefixes.append(name + "." if name else "")
            seen.update(id(p) for p in module.parameters())
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def saved_bytes(model: nn.Module) -> int:
    """Size in bytes of ``model.state_dict()`` written with ``torch.save`` to a temporary file.

    ``torch.save`` writes each storage once, so a tied tensor (several state-dict names) is
    counted once, as in the safetensors files of `workbench.export` (which store it once too).
    """
    fd, path = tempfile.mkstemp(suffix=".pt")
    os.close(fd)
    try:
        torch.save(model.state_dict(), path)
        return os.path.getsize(path)
    finally:
        os.remove(path)


@torch.no_grad()
def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example`` (counted by ``torch.utils.flop_counter``), run on
    the model's device."""
    was_training = model.training
    example = to_device(example, model_device(model))
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            model(example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 50, warmup: int = 5) -> float:
    """Median wall time in ms of ``model(example)`` over ``repeats`` runs, on the current threads.

    Runs on the model's device (``example`` moved there once, before timing); on CUDA the device
    is synchronized before each clock read, so a time covers the kernels, not their queueing."""
    return statistics.median(latency_samples(model, example, repeats, warmup))


def latency_spread(samples: Sequence[float]) -> dict[str, float]:
    """``{"median_ms", "q1_ms", "q3_ms"}`` of timings in ms (quartiles as ``numpy.percentile``'s linear
    interpolation, ``statistics.quantiles(method="inclusive")``; one sample: all three equal it)."""
    if not samples:
        raise WorkbenchError("latency_spread needs at least one timing; got none")
    q1 = q3 = samples[0]
    if len(samples) > 1:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median_ms": statistics.median(samples), "q1_ms": q1, "q3_ms": q3}


@torch.no_grad()
def latency_samples(model: nn.Module, example: torch.Tensor, repeats: int = 50, warmup: int = 5) -> list[float]:
    """Wall times in ms of ``repeats`` runs of ``model(example)`` after ``warmup`` untimed ones
    (see `latency_ms`), in the order measured."""
    if repeats < 1 or warmup < 0:
        raise WorkbenchError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    was_training = model.training
    device = model_device(model)
    example = to_device(example, device)
    model.eval()
    try:
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            model(example)
            synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        model.train(was_training)
    return times


#: Threads of the speed comparisons (`speedup`): fixed, so a figure does not depend on the machine's default.
SPEED_THREADS = 2


@contextlib.contextmanager
def fixed_threads(threads: int) -> Iterator[int]:
    """Run the block at ``torch.set_num_threads(threads)``; the previous count is restored after."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise WorkbenchError(f"threads={threads!r} must be an integer >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def compare_latency(models: Mapping[str, nn.Module], example: torch.Tensor, threads: int = SPEED_THREADS,
                    repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """``{name: median ms}`` of each model on ``example``, all measured in the same run at ``threads``.

    After ``warmup`` calls of each model, ``repeats`` rounds time every model once in turn, so a
    slower or busier stretch of the machine falls on all of them alike. Models run in eval mode
    on their own device (``example`` moved there once)."""
    if repeats < 1 or warmup < 0:
        raise WorkbenchError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    states = {name: model.training for name, model in models.items()}
    inputs = {name: to_device(example, model_device(model)) for name, model in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with fixed_threads(threads):
        try:
            for model in models.values():
                model.eval()
            for _ in range(warmup):
                for name, model in models.items():
                    model(inputs[name])
            for _ in range(repeats):
                for name, model in models.items():
                    device = model_device(model)
                    synchronize(device)
                    start = time.perf_counter()
                    model(inputs[name])
                    synchronize(device)
                    times[name].append((time.perf_counter() - start) * 1e3)
        finally:
            for name, model in models.items():
                model.train(states[name])
    return {name: statistics.median(values) for name, values in times.items()}


def speedup(original: nn.Module, compressed: nn.Module, example: torch.Tensor, threads: int = SPEED_THREADS,
            repeats: int = 20, warmup: int = 3) -> dict:
    """Measured speed-up of ``compressed`` over ``original`` beside their FLOP ratio.

    ``{"threads", "batch", "device", "original_ms", "compressed_ms", "speedup", "flop_ratio"}``:
    median ms of one call on ``example`` (batch = its first dimension), both measured in the same run
    (`compare_latency`); ``speedup = original_ms / compressed_ms`` (> 1: faster); ``flop_ratio``:
    the compressed model's FLOPs over the original's as executed (``torch.utils.flop_counter``).
    """
    ms = compare_latency({"original": original, "compressed": compressed}, example, threads, repeats, warmup)
    flops = count_flops(original, example)
    batch = int(example.shape[0]) if hasattr(example, "shape") else None
    return {"threads": threads, "batch": batch, "device": str(model_device(compressed)),
            "original_ms": round(ms["original"], 4), "compressed_ms": round(ms["compressed"], 4),
            "speedup": round(ms["original"] / ms["compressed"], 3),
            "flop_ratio": round(count_flops(compressed, example) / flops, 4) if flops else None}


def measure(model: nn.Module, task, latency: bool = True) -> Measurement:
    """`Measurement` ``{"metric", "params", "bytes", "flops", "latency_ms", "threads"}`` of ``model`` on ``task``.

    ``flops`` and ``latency_ms`` are for one sample (batch 1); ``bytes`` is the saved state_dict.
    ``params`` and ``bytes`` count a tied (shared) tensor once.
    """
    result = Measurement({
        "metric": task.evaluate(model),
        "params": count_params(model),
        "bytes": saved_bytes(model),
        "flops": count_flops(model, task.example_input),
    })
    if latency:
        result["latency_ms"] = latency_ms(model, task.example_input)
        result["threads"] = torch.get_num_threads()
    return result
