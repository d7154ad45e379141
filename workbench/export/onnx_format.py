"""ONNX export of compressed models, checked against PyTorch in onnxruntime.

``export_onnx(model, example, path)`` writes an ``.onnx`` file (atomically) and returns an
`OnnxExport` with its size in bytes and the exporter used; ``onnx_max_error(path, model, inputs)``
runs the file in onnxruntime and returns the largest absolute difference from PyTorch.

Exporter
--------
torch 2.13 has two exporters. ``dynamo=True`` (torch.export + onnxscript) is the maintained one;
the TorchScript one (``dynamo=False``) is deprecated and warns that it will be removed. Both export
our factorized layers (two Linear / Conv2d), structurally pruned layers (smaller plain layers)
and the int8 twins below. We try ``dynamo=True`` first and fall back to the legacy exporter only
if it raises, and record which one wrote the file.

int8
----
``torch.ao`` dynamic-quantized ``Linear`` calls ``quantized::linear_dynamic`` on an opaque packed
object: neither exporter handles it (legacy: "operator 'quantized::linear_dynamic' ... not
supported"; dynamo: torch.export fails on the packed-params script object). Before export we swap
each such module for `Int8WeightLinear`, which keeps the **same int8 codes and scales** as
buffers and computes ``x @ (codes * scale)^T + bias``. In the ONNX file the weight is an int8
initializer followed by ``Cast`` and ``Mul`` (a DequantizeLinear in QDQ terms): the file stores one
byte per weight; onnxruntime dequantizes on load and multiplies in float (weight-only int8, so
the outputs match PyTorch's dynamic int8 only up to its activation rounding; see tests).

`workbench.layers.quantized.Int8Linear` (which calls the same kernel) is swapped the same way,
recognised by its ``weight_int8`` / ``weight_scale`` buffers. Any other layer that does not trace may
define ``onnx_module() -> nn.Module``: an equivalent
module built from the same stored codes / factors; it is swapped in for export only.

Honest sizes
------------
The other compressed layers are swapped for the twins of `workbench.export.onnx_layers` (packed
codes -> ``DequantizeLinear`` of UINT4/UINT8 initializers; unstructured sparsity -> dense, said in
the notes; low-rank GRU/LSTM -> one ``GRU``/``LSTM`` node on the factor products), and the per-node
stack traces of the dynamo exporter are dropped. ``export_onnx(..., original=model)`` measures the
original's file the same way and says loudly when the compressed one is larger.
``quantize="qdq"``: int8 QDQ by onnxruntime's quantizer (`workbench.export.onnx_qdq`).
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.export.files import atomic_write
from workbench.export.onnx_qdq import quantize_qdq
from workbench.export.onnx_layers import Packing, onnx_twin, pack_weights, strip_debug_info
from workbench.inventory import set_submodule


class Int8WeightLinear(nn.Module):
    """``(…, in) -> (…, out)`` with int8 weight codes ``(out, in)`` and float scales ``(out, 1)``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.reshape(-1, 1).float())
        zero = zero_point.reshape(-1, 1).to(torch.int8)
        self.register_buffer("zero_point", zero if bool(zero.any()) else None)  # symmetric: no zero point
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_dynamic(cls, module: nn.Module) -> "Int8WeightLinear":
        """From a ``torch.ao.nn.quantized.dynamic.Linear`` (per-tensor or per-channel qint8)."""
        weight = module.weight()
        codes = weight.int_repr()
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            scale = torch.full((codes.shape[0],), weight.q_scale())
            zero = torch.full((codes.shape[0],), weight.q_zero_point())
        else:
            scale, zero = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        return cls(codes, scale, zero, module.bias())

    @classmethod
    def from_int8_linear(cls, module: nn.Module) -> "Int8WeightLinear":
        """From `workbench.layers.quantized.Int8Linear` (``weight_int8 (out, in)``, ``weight_scale (out,)``)."""
        codes = module.weight_int8
        return cls(codes, module.weight_scale, torch.zeros(codes.shape[0]), module.bias)

    def stored_weights(self) -> int:
        return self.codes.numel() + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.codes.float()
        if self.zero_point is not None:
            codes = codes - self.zero_point.float()
        weight = codes * self.scale
        return F.linear(x, weight, self.bias)


def _dynamic_linear_types() -> tuple[type, ...]:
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    except ImportError:  # pragma: no cover - torch.ao may leave torch one day
        return ()
    return (DynamicLinear,)


def _is_int8_linear(module: nn.Module) -> bool:
    """Duck-typed: a layer keeping int8 codes ``weight_int8 (out, in)`` and scales ``weight_scale (out,)``."""
    codes = getattr(module, "weight_int8", None)
    return (isinstance(codes, torch.Tensor) and codes.dtype == torch.int8 and codes.dim() == 2
            and isinstance(getattr(module, "weight_scale", None), torch.Tensor))


def _prepare(model: nn.Module) -> tuple[nn.Module, dict[str, Packing], list[str], list[str]]:
    """``(copy with twins swapped in, {parameter name: Packing}, names stored dense, other notes)``."""
    model = copy.deepcopy(model).eval()
    dynamic = _dynamic_linear_types()
    swaps, packings, dense, notes = [], {}, [], []
    twins: dict[int, nn.Module] = {}  # a module shared by several names (tied weights) gets one twin
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(done + ".") for done, _ in swaps):
            continue  # the model itself, or inside a module already swapped
        if id(module) in twins:
            swaps.append((name, twins[id(module)]))
            continue
        twin = onnx_twin(module)
        if twin is not None:
            swaps.append((name, twin.module))
            packings.update({f"{name}.{key}": packing for key, packing in twin.packings.items()})
            dense += [name] if twin.dense else []
            notes += [f"{name}: {twin.note}"] if twin.note else []
        elif hasattr(module, "onnx_module"):
            swaps.append((name, module.onnx_module()))
        elif dynamic and isinstance(module, dynamic):
            swaps.append((name, Int8WeightLinear.from_dynamic(module)))
        elif _is_int8_linear(module):
            swaps.append((name, Int8WeightLinear.from_int8_linear(module)))
        if swaps and swaps[-1][0] == name:
            twins[id(module)] = swaps[-1][1]
    for name, twin in swaps:
        set_submodule(model, name, twin)
    return model, packings, dense, notes


def prepare_for_onnx(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which compressed / untraceable modules are swapped for export twins."""
    return _prepare(model)[0]


@dataclass(frozen=True)
class OnnxExport:
    """An exported file: ``path``, its size in ``bytes``, the ``exporter`` that wrote it, ``notes``
    (what ONNX stores dense or widened, and the size guard), and ``original_bytes``: the size of the
    original model's ONNX file written the same way (None when no original was given)."""

    path: Path
    bytes: int
    exporter: str
    notes: tuple[str, ...] = ()
    original_bytes: int | None = None


def _export(model: nn.Module, example: torch.Tensor, path: str, dynamo: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(model, (example,), None, dynamo=True, verbose=False,
                                        input_names=["input"], output_names=["output"],
                                        dynamic_shapes=({0: batch},), external_data=False,
                                        optimize=False)  # the optimizer would fold small int8 weights to float
            program.save(path)
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"},
                                                                     "output": {0: "batch"}},
                              do_constant_folding=False)  # folding would store int8 weights as float


def _export_packed(model: nn.Module, example: torch.Tensor, path: str, dynamo: bool,
                   packings: dict[str, Packing]) -> list[str]:
    """Export, drop debug info, pack ``packings``; returns the packed weights left float (not found)."""
    import onnx  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    _export(model, example, path, dynamo)
    proto = onnx.load(path)
    strip_debug_info(proto)
    missing = pack_weights(proto, packings) if packings else []
    onnx.save(proto, path)
    return missing


def _write(model: nn.Module, example: torch.Tensor, path: str | os.PathLike,
           exporter: str) -> tuple[Path, str, list[str]]:
    """Write ``model`` with the first exporter that works: ``(path, exporter, notes)``."""
    ready, packings, dense, notes = _prepare(model)
    if dense:
        notes.append(f"unstructured sparsity is stored dense in ONNX (onnxruntime has no compact sparse "
                     f"matmul on CPU): {', '.join(dense)} hold their zeros, as large as the dense layers")
    widened = sorted({p.bits for p in packings.values() if p.bits not in (4, 8)})
    if widened:
        notes.append(f"{'/'.join(map(str, widened))}-bit codes are widened to "
                     f"{'4 or 8' if any(b > 4 for b in widened) else '4'} bits in ONNX (UINT4/UINT8 DequantizeLinear)")
    tries = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    failures = []
    for name in tries:
        missing: list[str] = []
        try:
            with torch.no_grad():
                written = atomic_write(path, lambda tmp, n=name: missing.extend(
                    _export_packed(ready, example, tmp, n == "dynamo", packings)))
            if missing:
                notes.append(f"not packed (float32 in ONNX): {', '.join(missing)}")
            return written, name, notes
        except WorkbenchError:
            raise
        except Exception as exc:  # exporter internals raise many types; report them all
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    raise WorkbenchError(f"ONNX export of {type(model).__name__} failed; " + "; ".join(failures))


def _write_qdq(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, exporter: str,
               calibration: torch.Tensor) -> tuple[Path, str, list[str]]:
    """The float export of ``model``, int8-quantized to QDQ by onnxruntime (`onnx_qdq.quantize_qdq`)."""
    with tempfile.TemporaryDirectory() as folder:
        float_path = os.path.join(folder, "float.onnx")
        _, used, notes = _write(model, example, float_path, exporter)
        try:
            written = atomic_write(path, lambda tmp: quantize_qdq(float_path, tmp, calibration))
        except (WorkbenchError, OSError):
            raise
        except Exception as exc:  # onnxruntime's quantizer raises many types
            raise WorkbenchError(f"onnxruntime could not quantize the ONNX graph of {type(model).__name__} "
                                 f"to int8 QDQ: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    notes.append("int8 QDQ graph (onnxruntime quantize_static): int8 per-channel weights, uint8 activations "
                 f"calibrated on {calibration.shape[0]} inputs")
    return written, used, notes


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike, exporter: str = "auto",
                original: nn.Module | None = None, quantize: str | None = None,
                calibration: torch.Tensor | None = None) -> OnnxExport:
    """Write ``model`` as ONNX to ``path`` (batch dimension dynamic) and return what was written.

    ``example``: ``(1, ...)`` input. ``exporter``: ``"dynamo"``, ``"legacy"`` or ``"auto"`` (dynamo,
    then legacy if dynamo raises). Raises `WorkbenchError` naming both failures if none works.
    ``original``: the uncompressed model; its ONNX size is measured (same exporter, a temporary
    file) and reported as ``original_bytes``, and a file larger than it gets a loud note and a warning.
    ``quantize="qdq"``: an int8 QDQ graph made by onnxruntime's static quantizer, calibrated on
    ``calibration`` ``(n, ...)`` inputs (`workbench.export.onnx_qdq`).
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise WorkbenchError(f"exporter={exporter!r} must be 'auto', 'dynamo' or 'legacy'")
    if quantize not in (None, "qdq"):
        raise WorkbenchError(f"quantize={quantize!r} must be None or 'qdq'")
    if quantize and calibration is None:
        raise WorkbenchError("quantize='qdq' needs calibration inputs (n, ...) to set the activation ranges")
    if example.shape[0] < 2:
        # torch.export specialises a dimension of size 1; trace with two rows, keep batch dynamic.
        example = torch.cat([example, example])
    if quantize:
        written, used, notes = _write_qdq(model, example, path, exporter, calibration)
    else:
        written, used, notes = _write(model, example, path, exporter)
    size, original_bytes = os.path.getsize(written), None
    if original is not None:
        with tempfile.TemporaryDirectory() as folder:
            reference, _, _ = _write(original, example, os.path.join(folder, "original.onnx"), used)
            original_bytes = os.path.getsize(reference)
        if size > original_bytes:
            message = (f"LARGER THAN THE ORIGINAL: this ONNX file is {size} B, the original model's "
                       f"{original_bytes} B ({size / original_bytes:.2f}x)")
            notes.append(message)
            warnings.warn(message, stacklevel=2)
    return OnnxExport(written, size, used, tuple(notes), original_bytes)


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU ``InferenceSession`` for ``path`` (``threads``: intra-op threads)."""
    import onnxruntime as ort  # noqa: PLC0415 (optional heavy dependency, loaded on first use)

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise WorkbenchError(f"onnxruntime cannot load {str(path)!r}: {exc}") from None


def onnx_outputs(path: str | os.PathLike, inputs: torch.Tensor, session=None) -> torch.Tensor:
    """Outputs of the ONNX file on ``inputs`` ``(n, ...)``, as a torch tensor."""
    session = session or onnx_session(path)
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().numpy()}
    return torch.from_numpy(session.run(None, feed)[0])


@torch.no_grad()
def onnx_max_error(path: str | os.PathLike, model: nn.Module, inputs: torch.Tensor) -> float:
    """Largest ``|onnxruntime(path)(inputs) - model(inputs)|`` over all outputs."""
    expected = model.eval()(inputs)
    return float((onnx_outputs(path, inputs) - expected).abs().max())
