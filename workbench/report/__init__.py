"""The headless report: run the study, export the chosen model, write ``index.html`` and ``results.json``.

``write_report(task, out_dir, budget, config)`` checks that ``out_dir`` is writable *before* any
work, runs `workbench.report.study.run_study`, exports the chosen model (safetensors + ONNX) and
the original (ONNX) under ``out_dir/models/``, checks the exports (safetensors reloads
bit-identically, ONNX matches PyTorch in onnxruntime) and writes every file atomically.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.export import atomic_write, check_writable_dir
from workbench.report.study import Study, StudyConfig, run_study
from workbench.export import load_compressed, save_compressed
from workbench.zoo import available_models
from workbench.export import export_onnx, onnx_max_error
from workbench.version import __version__
from workbench.report.html import render
from workbench.results import dumps

ONNX_TOLERANCE = 1e-4


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "to_dict"):
        return _json_ready(value.to_dict())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def export_models(study: Study, models_dir: Path, onnx: bool = True) -> dict:
    """Write the chosen model (safetensors, ONNX) and the original (ONNX) to ``models_dir``.

    Returns ``{"files": [{"file", "bytes", "note"}], ...}`` and fills ``disk["onnx"]`` of the
    measures with the ONNX file sizes.
    """

    task = study.task
    files = []
    measures = study.results.get("measures", {})
    inputs = task.eval_inputs[:256]
    if study.model is not None:
        embedded = task.name in available_models()
        path = save_compressed(models_dir / "compressed.safetensors", study.model, study.plan, task.name,
                               original=None if embedded else task.model, example_input=task.example_input)
        reloaded = load_compressed(path, original=None if embedded else task.model).model
        with torch.no_grad():
            same = torch.equal(reloaded(inputs), study.model(inputs))
        files.append({"file": "models/compressed.safetensors", "bytes": os.path.getsize(path),
                      "note": "reloads bit-identically" if same else "RELOAD DIFFERS"})
    if onnx:

        for label, model in (("original", task.model), ("chosen", study.model)):
            if model is None:
                continue
            name = "original.onnx" if label == "original" else "compressed.onnx"
            try:
                written = export_onnx(model, task.example_input, models_dir / name)
            except WorkbenchError as exc:
                files.append({"file": f"models/{name}", "bytes": None, "note": f"not exported: {exc}"})
                continue
            error = onnx_max_error(written.path, model, inputs)
            files.append({"file": f"models/{name}", "bytes": written.bytes,
                          "note": f"{written.exporter} exporter; onnxruntime max |diff| {error:.1e}"
                                  + ("" if error <= ONNX_TOLERANCE else " (ABOVE TOLERANCE)")
                                  + "".join(f"; {note}" for note in written.notes)})
            if label in measures:
                measures[label]["disk"]["onnx"] = written.bytes
                measures[label]["disk"]["onnx_exporter"] = written.exporter
        compare = measures.get("compare")
        if compare and measures["original"]["disk"].get("onnx") and measures.get("chosen", {}).get("disk", {}).get("onnx"):
            compare["size_ratio_onnx"] = measures["original"]["disk"]["onnx"] / measures["chosen"]["disk"]["onnx"]
            if compare["size_ratio_onnx"] < 1:
                files[-1]["note"] += "; LARGER THAN THE ORIGINAL'S ONNX FILE"
    return {"files": files}


def write_report(task, out_dir: str | os.PathLike, budget: float = 0.3,
                 config: StudyConfig | None = None) -> dict:
    """Run the study on ``task`` and write ``out_dir/index.html``, ``results.json`` and ``models/``.

    Returns ``{"index", "results", "models", "study"}`` (paths and the `Study`). Raises
    `WorkbenchError` before any work when ``out_dir`` cannot be created or written.
    """

    config = config or StudyConfig()
    out = check_writable_dir(out_dir, create=True)
    study = run_study(task, budget, config)
    models_dir = check_writable_dir(out / "models", create=True)
    study.results["versions"] = {"workbench": __version__, "torch": torch.__version__}
    try:
        study.results["exports"] = export_models(study, models_dir, onnx=config.onnx)
    except WorkbenchError as exc:
        study.results["skipped"].append({"stage": "exports", "reason": str(exc)})
    results = _json_ready(study.results)
    results_path = atomic_write(out / "results.json",
                                lambda tmp: Path(tmp).write_text(dumps(results, indent=1)))
    index = atomic_write(out / "index.html", lambda tmp: Path(tmp).write_text(render(results, study.figures)))
    return {"index": index, "results": results_path, "models": models_dir, "study": study}


__all__ = ["Study", "StudyConfig", "run_study", "write_report"]
