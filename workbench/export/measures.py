"""Shipping measures of a model: bytes on disk per format, latency at two batch sizes, peak memory.

These complement `workbench.measure` (parameters, FLOPs, one latency) with what a deployment
cares about; every number is measured on real files and real runs, never estimated:

* ``disk_bytes``: size of the file actually written as a ``torch.save`` state_dict (``.pt``),
  safetensors (`workbench.export` layout, weights only) and ONNX (`workbench.export.onnx_format`).
* ``latency_profile``: median wall time (ms) of ``repeats`` forward passes at batch 1 and at a
  large batch, with the number of intra-op threads stated (and set for the run).
* ``peak_memory_bytes``: extra resident memory one forward pass needs. Method (Linux): free heap
  pages are returned to the OS (``malloc_trim(0)``), the kernel's RSS high-water mark is reset
  (``echo 5 > /proc/self/clear_refs``), the model runs once, and ``VmHWM - VmRSS(before)`` is read
  from ``/proc/self/status``. Weights already resident are *not* counted; activations,
  temporaries and on-the-fly dequantized weights are. ``tracemalloc`` would miss torch's C++
  allocations, which is why we read the kernel's counters. Median of 3 runs; page granularity
  (4 KiB), so tiny models read as a few pages. ``None`` where the kernel does not offer it.
* ``shipping_measures``: all of the above plus params, FLOPs and the task metric, and
  ``compare``: the theoretical FLOP ratio beside the measured speed-ups.
"""
from __future__ import annotations

import copy
import ctypes
import gc
import os
import statistics
import tempfile
from contextlib import contextmanager

import torch
from torch import nn

from safetensors.torch import save_file

from workbench.device import model_device, synchronize, to_device
from workbench.errors import WorkbenchError
from workbench.export.files import _encode_state
from workbench.export.onnx_format import export_onnx
from workbench.measure import count_flops, count_params, latency_ms, saved_bytes

FORMATS = ("pt", "safetensors", "onnx")
LARGE_BATCH = 256


@contextmanager
def threads(n: int | None):
    """Run the block with ``torch.set_num_threads(n)`` (``None``: leave as is), restoring after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def safetensors_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state written as safetensors (quantized tensors as int8 codes)."""
    tensors, _ = _encode_state(model.state_dict())
    tensors = {key: tensor.cpu() for key, tensor in tensors.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.safetensors")
        save_file(tensors, path)
        return os.path.getsize(path)


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> tuple[int | None, str]:
    """``(bytes, exporter)`` of the ONNX file of ``model``; ``(None, reason)`` if it cannot export.
    A model on another device is exported from a CPU copy (the file holds the same tensors)."""
    if model_device(model).type != "cpu":
        model, example = copy.deepcopy(model).cpu(), to_device(example, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        try:
            written = export_onnx(model, example, os.path.join(folder, "m.onnx"))
        except WorkbenchError as exc:
            return None, str(exc)
        return written.bytes, written.exporter


def disk_bytes(model: nn.Module, example: torch.Tensor, formats: tuple[str, ...] = FORMATS) -> dict:
    """``{format: bytes of the file written}`` for ``formats`` among ``pt``, ``safetensors``, ``onnx``.

    ONNX adds ``onnx_exporter`` (``dynamo``/``legacy``) or, when export fails, ``onnx_error``.
    """
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise WorkbenchError(f"formats {sorted(unknown)} unknown; choose among {FORMATS}")
    result: dict = {}
    if "pt" in formats:
        result["pt"] = saved_bytes(model)
    if "safetensors" in formats:
        result["safetensors"] = safetensors_bytes(model)
    if "onnx" in formats:
        size, note = onnx_bytes(model, example)
        result["onnx"] = size
        result["onnx_exporter" if size is not None else "onnx_error"] = note
    return result


def batch_of(inputs: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows from ``inputs`` (repeated if there are fewer): ``(n, ...)``."""
    reps = -(-n // len(inputs))
    return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:n] if reps > 1 else inputs[:n]


def latency_profile(model: nn.Module, inputs: torch.Tensor, large_batch: int = LARGE_BATCH,
                    n_threads: int | None = None, repeats: int = 30) -> dict:
    """Median latency in ms at batch 1 and at ``large_batch`` with ``n_threads`` intra-op threads.

    Returns ``{"batch1_ms", "large_batch", "large_ms", "large_per_sample_us", "threads", "repeats"}``.
    """
    with threads(n_threads) as used:
        one = latency_ms(model, inputs[:1], repeats=repeats, warmup=3)
        large = latency_ms(model, batch_of(inputs, large_batch), repeats=max(5, repeats // 3), warmup=2)
    return {"batch1_ms": one, "large_batch": large_batch, "large_ms": large,
            "large_per_sample_us": large * 1e3 / large_batch, "threads": used, "repeats": repeats}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def peak_memory_bytes(model: nn.Module, inputs: torch.Tensor, runs: int = 3) -> int | None:
    """Extra resident bytes one ``model(inputs)`` needs (see module docstring); None if unsupported.
    On a CUDA device: the peak of the device's allocated bytes during the run above those before."""
    device = model_device(model)
    inputs = to_device(inputs, device)
    if device.type == "cuda":
        return _cuda_peak_bytes(model, inputs, device)
    if not (os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)):
        return None
    was_training = model.training
    model.eval()
    peaks = []
    try:
        model(inputs)  # lazy initialisation (thread pools, packed weights) is not inference memory
        for _ in range(runs):
            gc.collect()
            _trim_heap()
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            before = _status_kb("VmRSS")
            out = model(inputs)
            peak = _status_kb("VmHWM")
            del out
            peaks.append(max(0, peak - before) * 1024)
    except OSError:
        return None
    finally:
        model.train(was_training)
    return int(statistics.median(peaks))


@torch.no_grad()
def _cuda_peak_bytes(model: nn.Module, inputs: torch.Tensor, device: torch.device) -> int:
    was_training = model.training
    model.eval()
    try:
        model(inputs)
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = model(inputs)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
    finally:
        model.train(was_training)
    return max(0, peak - before)


def shipping_measures(model: nn.Module, task, large_batch: int = LARGE_BATCH, n_threads: int | None = None,
                      formats: tuple[str, ...] = FORMATS, repeats: int = 30) -> dict:
    """Everything the report tables show for one model on ``task``.

    ``{"metric", "params", "flops" (batch 1), "disk": disk_bytes(...), "latency": latency_profile(...),
    "peak_memory_bytes": {"batch1", "large"}}``.
    """
    example = task.example_input
    large = batch_of(task.eval_inputs, large_batch)
    with threads(n_threads):
        memory = {"batch1": peak_memory_bytes(model, example), "large": peak_memory_bytes(model, large)}
    return {"metric": task.evaluate(model), "params": count_params(model), "flops": count_flops(model, example),
            "disk": disk_bytes(model, example, formats),
            "latency": latency_profile(model, task.eval_inputs, large_batch, n_threads, repeats),
            "peak_memory_bytes": memory}


def compare(before: dict, after: dict) -> dict:
    """Ratios of two `shipping_measures`: theoretical FLOP ratio beside measured speed-ups.

    ``flop_ratio`` = FLOPs before / after (what the arithmetic promises; None when the counter
    sees no FLOPs after); ``speedup_batch1`` and
    ``speedup_large`` = latency before / after (what the clock says), ``size_ratio_<fmt>`` = bytes
    before / after.
    """
    # A model whose FLOPs read 0 runs ops the counter does not see (e.g. quantized::linear_dynamic):
    # no ratio rather than a meaningless one.
    result = {"flop_ratio": before["flops"] / after["flops"] if after["flops"] else None,
              "param_ratio": before["params"] / max(after["params"], 1),
              "speedup_batch1": before["latency"]["batch1_ms"] / after["latency"]["batch1_ms"],
              "speedup_large": before["latency"]["large_ms"] / after["latency"]["large_ms"],
              "metric_change": after["metric"] - before["metric"]}
    for fmt in FORMATS:
        if before["disk"].get(fmt) and after["disk"].get(fmt):
            result[f"size_ratio_{fmt}"] = before["disk"][fmt] / after["disk"][fmt]
    return result
