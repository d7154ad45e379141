"""Exporting compressed models: safetensors files that load back, ONNX, and shipping measures.

``save_compressed(path, model, plan)`` / ``load_compressed(path)``: one .safetensors file holding
the compressed tensors (packed codes, factors, kept channels) and the plan that rebuilds the
structure, checked by per-tensor SHA-256 on load (`files`). ``export_onnx``: an ONNX graph for
onnxruntime (`onnx_format`; needs the ``onnx`` extra). ``shipping_measures``: bytes on disk per
format, latency and peak memory (`measures`).
"""
from workbench.export.files import (EXPORT_FORMAT_VERSION, HEADER_KEY, Loaded, atomic_write, check_plan_fits, plan_layer_shapes,
                                    check_writable_dir, fingerprint, load_compressed, plan_sidecar, read_header,
                                    save_compressed)
from workbench.export.measures import compare, disk_bytes, latency_profile, shipping_measures
from workbench.export.onnx_format import OnnxExport, export_onnx, onnx_max_error, onnx_outputs, onnx_session

__all__ = ["EXPORT_FORMAT_VERSION", "HEADER_KEY", "Loaded", "OnnxExport", "atomic_write", "check_plan_fits",
           "check_writable_dir", "compare", "disk_bytes", "export_onnx", "fingerprint", "latency_profile",
           "load_compressed", "onnx_max_error", "onnx_outputs", "onnx_session", "plan_layer_shapes", "plan_sidecar", "read_header",
           "save_compressed", "shipping_measures"]
