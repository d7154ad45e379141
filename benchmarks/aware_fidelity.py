"""Plain vs activation-aware SVD (whiten, scale) vs magnitude pruning: fidelity at kept ratios.

Prints JSON lines, then a table: MiniLM (mean cosine to the original's embeddings, nearest-
neighbour agreement, Spearman of pairwise similarities, on evaluation sentences whose topics are
not in the calibration set) and the digits models (test accuracy), at kept ratios 0.8, 0.6, 0.5,
0.4 of every compressible layer's parameters (pruning: kept fraction of weights). Also times one
end-to-end aware compression of MiniLM (calibration included) on 2 threads, and writes a chart
(``--chart PATH``). Run: ``python benchmarks/aware_fidelity.py [--models minilm digits-mlp ...]``.

Variants: ``plain``, ``whiten``, ``scale`` (one-shot, the same kept ratio in every layer);
``whiten+seq`` (sequential calibration, each layer refitted to the original outputs from the
partly compressed model's inputs, `workbench.sequential`); ``alloc`` and ``alloc+seq`` (whiten,
one option per layer, dense or a rank, chosen under the same TOTAL budget from losses measured on
calibration samples, `workbench.select.aware_budget`); ``alloc+seq+block`` (``alloc+seq``, then
block-wise reconstruction: each encoder block's factors tuned so the block reproduces the
original's outputs on the calibration sentences, `workbench.recovery.blockwise`; its
``compress_s`` includes the ``alloc+seq`` step); ``prune`` (magnitude pruning). ``compress_s`` is the end-to-end
time of that row (plan, calibration, factorization); the machine's load average is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from doc_results import markdown_table, write_section
from matplotlib.figure import Figure

import workbench as wb
from workbench.inventory import matrix_layers
from workbench.plotting.heatmaps import draw_fidelity_by_ratio
from workbench.recovery.blockwise import reconstruct_blocks
from workbench.registry import get_recipe
from workbench.select.aware_budget import allocated_plan
from workbench.zoo import minilm

RATIOS = (0.8, 0.6, 0.5, 0.4)
VARIANTS = ("plain", "whiten", "scale", "whiten+seq", "alloc", "alloc+seq", "alloc+seq+block", "prune")
#: Column titles of the tables in docs/results/aware-fidelity.md.
LABELS = {"plain": "plain SVD", "whiten": "whiten", "scale": "scale", "whiten+seq": "whiten + sequential",
          "whiten+block": "whiten + block-wise",
          "alloc": "whiten, allocated", "alloc+seq": "allocated + sequential",
          "alloc+seq+block": "allocated + sequential + block-wise", "prune": "magnitude pruning"}


def compress(task, variant: str, ratio: float, built: dict | None = None):
    """The compressed model of ``variant`` at ``ratio``; ``built`` memoizes ``{(variant, ratio): model}``."""
    calibration = task.calibration_inputs()
    if variant.endswith("+block"):
        base = variant.removesuffix("+block")
        model = (built or {}).get((base, ratio))
        model = compress(task, base, ratio) if model is None else model
        return reconstruct_blocks(model, task.model, task.train_inputs, progress=False).model
    if variant == "prune":
        plan = get_recipe("prune")(task.model, task=task, ratio=ratio)
    elif variant.startswith("alloc"):
        plan = allocated_plan(task.model, calibration, ratio, sequential=variant.endswith("+seq"))
    else:
        mode = variant.removesuffix("+seq")
        plan = get_recipe("svd")(task.model, ratio=ratio, activation_aware=None if mode == "plain" else mode,
                                 sequential=variant.endswith("+seq"))
    return wb.apply(task.model, plan, calibration_inputs=calibration)


def scores(task, model) -> dict:
    out = task.outputs(model)
    if task.name != "minilm":
        return {task.metric_name: round(task.metric(out, task.eval_targets), 4)}
    return {"mean_cosine": round(minilm.mean_cosine(out, task.eval_targets), 4),
            "neighbour_agreement": round(minilm.neighbour_agreement(out, task.eval_targets), 4),
            "spearman": round(minilm.similarity_spearman(out, task.eval_targets), 4)}


def doc_table(table: list[dict], name: str, ratios: list[float], variants: list[str], key: str) -> str:
    """Markdown: one row per kept ratio, one column per variant, the best low-rank cell in bold, and
    a last row with each variant's mean end-to-end seconds."""
    rows = []
    for ratio in ratios:
        found = {v: next(r for r in table if r["model"] == name and r["ratio"] == ratio and r["variant"] == v)
                 for v in variants}
        values = {v: row[key] for v, row in found.items() if not row.get("skipped")}
        best = max((value for v, value in values.items() if v != "prune"), default=None)
        rows.append([f"{ratio:.0%}"] + [("n/a" if v not in values else
                                          f"**{values[v]:.3f}**" if values[v] == best else f"{values[v]:.3f}")
                                         for v in variants])
    seconds = []
    for v in variants:
        times = [r["compress_s"] for r in table if r["model"] == name and r["variant"] == v and not r.get("skipped")]
        seconds.append(f"~{sum(times) / len(times):.0f}" if times else "n/a")
    return markdown_table(["kept weights"] + [LABELS.get(v, v) for v in variants], rows + [["seconds"] + seconds])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["minilm", "digits-mlp", "digits-cnn"])
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chart", help="write a PNG chart of the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({"threads": args.threads, "cpus": os.cpu_count(),
                      "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()]}), flush=True)
    table = []
    for name in args.models:
        built, seconds_of = {}, {}
        start = time.perf_counter()
        task = wb.load(name)
        if name == "minilm":
            print(json.dumps({"model": name, "load_s": round(time.perf_counter() - start, 1),
                              "calibration": task.extras["calibration_counts"],
                              "evaluation_sentences": len(task.extras["sentences"])}), flush=True)
        for ratio in args.ratios:
            for variant in args.variants:
                if variant.startswith("alloc") and any(i.kind != "linear" for i in matrix_layers(task.model)):
                    table.append({"model": name, "ratio": ratio, "variant": variant, "skipped": True})
                    continue  # the allocator handles Linear layers only
                start = time.perf_counter()
                model = compress(task, variant, ratio, built)
                if f"{variant}+block" in args.variants:
                    built[variant, ratio] = model  # reused by the +block row
                seconds = seconds_of[variant, ratio] = time.perf_counter() - start
                if variant.endswith("+block"):
                    seconds += seconds_of.get((variant.removesuffix("+block"), ratio), 0.0)
                row = {"model": name, "ratio": ratio, "variant": variant,
                       "compress_s": round(seconds, 1), **scores(task, model)}
                print(json.dumps(row), flush=True)
                table.append(row)
    print(json.dumps({"load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()]}), flush=True)
    key = {"minilm": "mean_cosine"}
    print("\nmodel        ratio  " + "  ".join(f"{v:>10}" for v in args.variants))
    for name in args.models:
        for ratio in args.ratios:
            cells = []
            for variant in args.variants:
                row = next(r for r in table if r["model"] == name and r["ratio"] == ratio and r["variant"] == variant)
                cells.append(f"{'n/a':>10}" if row.get("skipped") else f"{row[key.get(name, 'accuracy')]:10.4f}")
            print(f"{name:12} {ratio:5.2f}  " + "  ".join(cells))
    for name in args.models:
        settings = f"--models {name} --variants {' '.join(args.variants)} --ratios {' '.join(map(str, args.ratios))}"
        metric = "mean cosine to the original" if name in key else "test accuracy"
        write_section("aware-fidelity", f"aware_fidelity.py {settings}",
                      f"{metric}; seconds: end to end on {args.threads} threads, calibration included\n\n"
                      + doc_table(table, name, args.ratios, args.variants, key.get(name, "accuracy")),
                      title=f"{name}: benchmarks/aware_fidelity.py {settings}")
    if args.chart:
        fig = Figure(figsize=(4 * len(args.models), 3.2))  # no pyplot: no GUI backend, nothing to close
        axes = fig.subplots(1, len(args.models), squeeze=False)
        for ax, name in zip(axes[0], args.models):
            series = {v: [next(r for r in table if r["model"] == name and r["ratio"] == q and r["variant"] == v)
                          [key.get(name, "accuracy")] for q in args.ratios] for v in args.variants
                      if not any(r.get("skipped") for r in table if r["model"] == name and r["variant"] == v)}
            draw_fidelity_by_ratio(ax, list(args.ratios), series, title=name)
        fig.tight_layout()
        fig.savefig(args.chart, dpi=100)
        print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
