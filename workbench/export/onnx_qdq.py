"""int8 QDQ ONNX graphs by onnxruntime's own static quantizer, and the integer kernels they run on.

``quantize_qdq(float_path, path, calibration)`` quantizes a float ONNX file with
``onnxruntime.quantization.quantize_static`` in QDQ format: weights int8 per output channel
(symmetric), activations uint8 with ranges calibrated (MinMax) on ``calibration`` ``(n, ...)``
inputs. ``integer_kernels(path)`` lists the operators of the graph onnxruntime actually runs after
its CPU optimizations (``QLinearMatMul`` / ``QGemm`` / ``MatMulInteger`` / ``QLinearConv`` ...):
the Q/DQ pairs around a MatMul or Gemm are fused into one integer kernel there.
"""
from __future__ import annotations

import os
import tempfile

import torch

from workbench.errors import WorkbenchError

INTEGER_OPS = ("QLinearMatMul", "QGemm", "MatMulInteger", "QLinearConv", "ConvInteger", "DynamicQuantizeMatMul",
               "MatMulIntegerToFloat", "QLinearAdd", "QLinearMul")
CALIBRATION_BATCH = 64


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over ``(n, ...)`` inputs in batches."""

    def __init__(self, name: str, inputs: torch.Tensor):
        self.batches = iter([{name: chunk.detach().cpu().float().numpy()}
                             for chunk in inputs.split(CALIBRATION_BATCH)])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):  # pragma: no cover - onnxruntime calls it only for some calibration methods
        raise WorkbenchError("the calibration reader cannot be rewound")


def quantize_qdq(float_path: str | os.PathLike, path: str | os.PathLike, calibration: torch.Tensor) -> None:
    """Write the int8 QDQ version of the float ONNX file ``float_path`` to ``path``."""
    import onnx  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static  # noqa: PLC0415

    if calibration.shape[0] < 1:
        raise WorkbenchError(f"calibration has {calibration.shape[0]} rows; the QDQ ranges need at least 1")
    name = onnx.load(str(float_path), load_external_data=False).graph.input[0].name
    quantize_static(str(float_path), str(path), _Reader(name, calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def integer_kernels(path: str | os.PathLike) -> list[str]:
    """Sorted operator types of ``path``'s graph after onnxruntime's CPU optimizations that compute in integers."""
    import onnx  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    import onnxruntime as ort  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return sorted({node.op_type for node in graph.node if node.op_type in INTEGER_OPS})
