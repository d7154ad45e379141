"""Plain vs activation-aware SVD (whiten, scale) vs magnitude pruning: fidelity at kept ratios.

Prints JSON lines, then a table: MiniLM (mean cosine to the original's embeddings, nearest-
neighbour agreement, Spearman of pairwise similarities, on evaluation sentences whose topics are
not in the calibration set) and the digits models (test accuracy), at kept ratios 0.8, 0.6, 0.5,
0.4 of every compressible layer's parameters (pruning: kept fraction of weights). Also times one
end-to-end aware compression of MiniLM (calibration included) on 2 threads, and writes a chart
(``--chart PATH``). Run: ``python benchmarks/aware_fidelity.py [--models minilm digits-mlp ...]``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import workbench as wb
from workbench.registry import get_recipe
from workbench.zoo import minilm

RATIOS = (0.8, 0.6, 0.5, 0.4)
VARIANTS = ("plain", "whiten", "scale", "prune")


def compress(task, variant: str, ratio: float):
    if variant == "prune":
        plan = get_recipe("prune")(task.model, task=task, ratio=ratio)
    else:
        plan = get_recipe("svd")(task.model, ratio=ratio,
                                 activation_aware=None if variant == "plain" else variant)
    return wb.apply(task.model, plan, calibration_inputs=task.calibration_inputs())


def scores(task, model) -> dict:
    out = task.outputs(model)
    if task.name != "minilm":
        return {task.metric_name: round(task.metric(out, task.eval_targets), 4)}
    return {"mean_cosine": round(minilm.mean_cosine(out, task.eval_targets), 4),
            "neighbour_agreement": round(minilm.neighbour_agreement(out, task.eval_targets), 4),
            "spearman": round(minilm.similarity_spearman(out, task.eval_targets), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["minilm", "digits-mlp", "digits-cnn"])
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chart", help="write a PNG chart of the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = []
    for name in args.models:
        start = time.perf_counter()
        task = wb.load(name)
        if name == "minilm":
            print(json.dumps({"model": name, "load_s": round(time.perf_counter() - start, 1),
                              "calibration": task.extras["calibration_counts"],
                              "evaluation_sentences": len(task.extras["sentences"])}), flush=True)
        for ratio in args.ratios:
            for variant in args.variants:
                start = time.perf_counter()
                model = compress(task, variant, ratio)
                seconds = time.perf_counter() - start
                row = {"model": name, "ratio": ratio, "variant": variant,
                       "compress_s": round(seconds, 1), **scores(task, model)}
                print(json.dumps(row), flush=True)
                table.append(row)
    key = {"minilm": "mean_cosine"}
    print("\nmodel        ratio  " + "  ".join(f"{v:>7}" for v in args.variants))
    for name in args.models:
        for ratio in args.ratios:
            cells = []
            for variant in args.variants:
                row = next(r for r in table if r["model"] == name and r["ratio"] == ratio and r["variant"] == variant)
                cells.append(f"{row[key.get(name, 'accuracy')]:7.4f}")
            print(f"{name:12} {ratio:5.2f}  " + "  ".join(cells))
    if args.chart:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from workbench.plotting.heatmaps import draw_fidelity_by_ratio
        fig, axes = plt.subplots(1, len(args.models), figsize=(4 * len(args.models), 3.2), squeeze=False)
        for ax, name in zip(axes[0], args.models):
            series = {v: [next(r for r in table if r["model"] == name and r["ratio"] == q and r["variant"] == v)
                          [key.get(name, "accuracy")] for q in args.ratios] for v in args.variants}
            draw_fidelity_by_ratio(ax, list(args.ratios), series, title=name)
        fig.tight_layout()
        fig.savefig(args.chart, dpi=100)
        print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
