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
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.export.files import atomic_write
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


def prepare_for_onnx(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which modules the exporters cannot trace are swapped for twins."""
    model = copy.deepcopy(model).eval()
    dynamic = _dynamic_linear_types()
    swaps = []
    for name, module in model.named_modules():
        if not name:
            continue
        if hasattr(module, "onnx_module"):
            swaps.append((name, module.onnx_module()))
        elif dynamic and isinstance(module, dynamic):
            swaps.append((name, Int8WeightLinear.from_dynamic(module)))
        elif _is_int8_linear(module):
            swaps.append((name, Int8WeightLinear.from_int8_linear(module)))
    for name, twin in swaps:
        if any(name.startswith(done + ".") for done, _ in swaps if done != name):
            continue  # inside a module already swapped
        set_submodule(model, name, twin)
    return model


@dataclass(frozen=True)
class OnnxExport:
    """An exported file: ``path``, its size in ``bytes``, and the ``exporter`` that wrote it."""

    path: Path
    bytes: int
    exporter: str


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


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike,
                exporter: str = "auto") -> OnnxExport:
    """Write ``model`` as ONNX to ``path`` (batch dimension dynamic) and return what was written.

    ``example``: ``(1, ...)`` input. ``exporter``: ``"dynamo"``, ``"legacy"`` or ``"auto"`` (dynamo,
    then legacy if dynamo raises). Raises `WorkbenchError` naming both failures if none works.
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise WorkbenchError(f"exporter={exporter!r} must be 'auto', 'dynamo' or 'legacy'")
    if example.shape[0] < 2:
        # torch.export specialises a dimension of size 1; trace with two rows, keep batch dynamic.
        example = torch.cat([example, example])
    ready = prepare_for_onnx(model)
    tries = {"auto": ("dynamo", "legacy"), "dynamo": ("dynamo",), "legacy": ("legacy",)}[exporter]
    failures = []
    for name in tries:
        try:
            with torch.no_grad():
                written = atomic_write(path, lambda tmp, n=name: _export(ready, example, tmp, n == "dynamo"))
            return OnnxExport(written, os.path.getsize(written), name)
        except WorkbenchError:
            raise
        except Exception as exc:  # exporter internals raise many types; report them all
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    raise WorkbenchError(f"ONNX export of {type(model).__name__} failed; " + "; ".join(failures))


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
