"""Shipping measures of digits-mlp and a few compressions: size per format, FLOPs, latency, memory.

    python benchmarks/export_measures.py [--threads 1] [--large-batch 256]

Prints one JSON object per model (params, metric, bytes as .pt / safetensors / ONNX, FLOPs, median
latency at batch 1 and the large batch, peak extra memory) and the ratios against the original:
the theoretical FLOP ratio beside the measured speed-ups. Recipes not registered are skipped.
"""
from __future__ import annotations

import argparse
import json
import warnings

import workbench as wb
from workbench.export import compare, shipping_measures
from workbench.errors import WorkbenchError
from workbench.registry import get_recipe, recipes

CASES = [("svd", {"ratio": 0.3}), ("prune", {"ratio": 0.5, "structured": True}), ("int8", {}),
         ("quant", {"bits": 4})]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--large-batch", type=int, default=256)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    task = wb.load(args.model)
    original = shipping_measures(task.model, task, args.large_batch, args.threads)
    print(json.dumps({"model": "original", **original}))
    for name, options in CASES:
        if name not in recipes():
            print(json.dumps({"model": name, "skipped": "recipe not registered"}))
            continue
        label = f"{name}({', '.join(f'{k}={v}' for k, v in options.items())})"
        try:
            plan = get_recipe(name)(task.model, task=task, **options)
            model = wb.apply(task.model, plan, calibration_inputs=task.calibration_inputs())
        except WorkbenchError as exc:
            print(json.dumps({"model": label, "skipped": str(exc)}))
            continue
        measured = shipping_measures(model, task, args.large_batch, args.threads)
        print(json.dumps({"model": label, **measured, "vs_original": compare(original, measured)}))


if __name__ == "__main__":
    main()
