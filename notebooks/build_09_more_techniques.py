"""Builds notebooks/09_more_techniques.ipynb (without outputs): ``python notebooks/build_09_more_techniques.py``."""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

md, code = new_markdown_cell, new_code_cell

cells = [
    md("""# 09 · More techniques: L1 training, BatchNorm folding, export, sweeps on Dask

Four short lessons, each with a live figure (move its control; the figure is redrawn on a compute
thread and replaced in the page):

1. [L1-regularised training](#1.-L1-regularised-training): train with a penalty that pushes weights to zero, then cut.
2. [BatchNorm folding](#2.-BatchNorm-folding): remove BatchNorm layers at inference, exactly.
3. [Export: safetensors and ONNX](#3.-Export:-safetensors-and-ONNX): files that load back and run in onnxruntime.
4. [A sweep on Dask](#4.-A-sweep-on-Dask): a sensitivity sweep on a local cluster.
5. [What you saw](#What-you-saw): the numbers of this run.

All the logic lives in `workbench` (`workbench.widgets.techniques`, `workbench.export.checks`);
the cells only call it."""),
    code("""%matplotlib inline
import logging

import pandas as pd
from IPython.display import Markdown

import workbench as wb
from workbench.export.checks import fold_bn_check
from workbench.plan import Plan
from workbench.registry import get_recipe
from workbench.widgets.techniques import ExportView, FoldView, L1View, SweepView

task = wb.load("digits-mlp")
print(f"{task.name}: test {task.metric_name} {task.evaluate():.3f}")"""),
    md("""## 1. L1-regularised training

Magnitude pruning removes small weights, but a network trained with plain cross-entropy has few
weights that are *exactly* small. Adding `l1 * sum |w|` to the loss pulls every weight towards
zero with a constant force (the gradient of `|w|` is `sign(w)`), so weights the task does not need
collapse near zero while useful ones stay large. After training, weights with `|w| <= 0.01` are cut
(`workbench.recovery.l1_regularised_pruning`, on a copy: the loaded model is never touched).

The slider trains a copy for each L1 strength (a few epochs, about a second) and shows the
magnitudes on a log axis with the cut, and the test accuracy after the cut against the fraction
pruned."""),
    code("""l1_view = L1View(task, strengths=(0.0, 1e-4, 3e-4, 1e-3, 3e-3), epochs=4, threshold=1e-2)
l1_view"""),
    code("""# What moving the slider through every strength does, run here so the table below has every row.
for strength in l1_view.control.options:
    l1_view.update(strength[1])
l1_table = pd.DataFrame([{"L1 strength": r["strength"], "pruned": r["pruned"], "accuracy before cut": r["dense_metric"],
                          "accuracy after cut": r["metric"]} for r in l1_view.runs.values()]).set_index("L1 strength")
plain = l1_table.loc[0.0]
kept_accuracy = l1_table[l1_table["accuracy after cut"] >= plain["accuracy after cut"] - 0.01]
best = kept_accuracy["pruned"].idxmax()
print(f"Plain training: {plain['pruned']:.1%} of the weights fall under the cut. The strongest L1 that stays within "
      f"1 point of plain training's accuracy is {best:g}: {l1_table.loc[best, 'pruned']:.1%} pruned at "
      f"{l1_table.loc[best, 'accuracy after cut']:.3f}.")
l1_table.style.format({"pruned": "{:.1%}", "accuracy before cut": "{:.3f}", "accuracy after cut": "{:.3f}"})"""),
    md("""## 2. BatchNorm folding

At inference a BatchNorm is a fixed per-channel affine map, `y = gamma * (x - mean) / sqrt(var + eps) + beta`,
with the running statistics. When it directly follows a convolution or linear layer, it can be
folded into that layer's weights and bias: `w' = w * gamma / sqrt(var + eps)`,
`b' = (b - mean) * gamma / sqrt(var + eps) + beta`. The outputs are the same up to float rounding;
one layer less runs.

`digits-resnet` has six BatchNorms, each right after a convolution: in the stem, two in each
residual block (called from the block's own `forward`) and one in block 2's shortcut. The `fold_bn`
step finds the pairs in the model's torch.fx graph and folds all six; a BatchNorm whose input is
not the lone output of a convolution (after an add, say) would stay, listed in `fold["left"]` with
the reason."""),
    code("""resnet = wb.load("digits-resnet")
fold = fold_bn_check(resnet.model, resnet.eval_inputs)
print(f"folded {len(fold['pairs'])} BatchNorms into {', '.join(layer for layer, _ in fold['pairs'])}; "
      f"BatchNorm modules {fold['bn_before']} -> {fold['bn_after']}")
print(f"parameters {fold['params_before']:,} -> {fold['params_after']:,}; max |output difference| on "
      f"{len(resnet.eval_inputs)} test images: {fold['max_abs_diff']:.2e}")
print(f"test accuracy {resnet.evaluate():.4f} -> {resnet.evaluate(fold['model']):.4f}")"""),
    md("""Latency: each bar is the median of 20 timed runs after a warm-up (taken in five slices that
alternate between the two models, so a slow spell of the machine hits both), the error bar spans
the first to the third quartile. Pick a batch size; the readout says whether the difference is larger
than the spread."""),
    code("""fold_view = FoldView({"original": resnet.model, "folded": fold["model"]}, resnet.eval_inputs,
                     batches=(1, 64, 256), repeats=20)
fold_view"""),
    code("""fold_view.update(256)
timings = {batch: state["timings"] for batch, state in fold_view.timings.items()}
verdicts = {}
for batch, t in timings.items():
    o, f = t["original"], t["folded"]
    spread = max(o["q3_ms"] - o["q1_ms"], f["q3_ms"] - f["q1_ms"])
    verdict = ("no difference beyond the spread" if abs(o["median_ms"] - f["median_ms"]) <= spread
               else f"folded {o['median_ms'] / f['median_ms']:.2f}x the speed of the original")
    verdicts[batch] = verdict
    print(f"batch {batch:>3}: original {o['median_ms']:.3f} ms, folded {f['median_ms']:.3f} ms "
          f"(quartile spread up to {spread:.3f} ms): {verdict}")"""),
    md("""## 3. Export: safetensors and ONNX

A compressed model is only smaller if the file is. `workbench.export.save_compressed` writes one
safetensors file (integer codes, factors, kept values) with the plan that rebuilds the structure;
`load_compressed` reads it back. `export_onnx` writes an ONNX graph that onnxruntime runs; the
honest export keeps the compression where ONNX can (int8 / 4-bit codes with `DequantizeLinear`,
two thin matrices for low rank) and says where it cannot: unstructured sparsity is stored dense,
because onnxruntime has no compact sparse matrix product on CPU.

Pick a compression: the bars are the files written (dense in grey, the percentage is compressed /
dense), the readout gives the round-trip errors (reloaded safetensors vs the model in memory, and
onnxruntime vs torch)."""),
    code("""plans = {
    "int8 weights": get_recipe("quant")(task.model, bits=8),
    "4-bit weights": get_recipe("quant")(task.model, bits=4),
    "SVD, 25% of the weights": get_recipe("svd")(task.model, ratio=0.25),
    "prune 80% (unstructured)": get_recipe("prune")(task.model, ratio=0.2),
}
export_view = ExportView(task, plans)
export_view"""),
    code("""for label in plans:
    export_view.update(label)
export_table = pd.DataFrame({label: {"safetensors B": r["safetensors_bytes"], "ONNX B": r["onnx_bytes"],
                                     "ONNX / dense": r["onnx_bytes"] / r["dense_onnx_bytes"],
                                     "reload max |diff|": r["load_max_diff"], "onnxruntime max |diff|": r["onnx_max_diff"]}
                             for label, r in export_view.results.items()}).T
dense_bytes = next(iter(export_view.results.values()))["dense_onnx_bytes"]
smallest = export_table["ONNX B"].idxmin()
no_gain = list(export_table.index[export_table["ONNX / dense"] >= 0.99])
print(f"dense ONNX file: {dense_bytes:,} B. Smallest ONNX file: {smallest} ({export_table.loc[smallest, 'ONNX / dense']:.0%} "
      f"of dense). No smaller as ONNX: {', '.join(no_gain) or 'none'}.")
export_table"""),
    md("""## 4. A sweep on Dask

A sensitivity analysis compresses one layer at a time at each setting and scores it: many small,
independent jobs. `workbench.select.sensitivity(..., executor=client)` sends them to the workers
of a `dask.distributed` client; the results come back in order and are the same as in this process
(`tests/test_sweeps.py` checks it). Here the cluster is local (two workers of one thread each,
inside this kernel: no network, no dashboard); point a `Client` at a real scheduler to use more
machines. The bar counts the finished sweeps; the cluster is closed at the end of the cell."""),
    code("""from distributed import Client, LocalCluster
from tqdm.auto import tqdm

from workbench.select import sensitivity

grids = {"svd": (0.05, 0.1, 0.25, 0.5), "prune": (0.05, 0.1, 0.25, 0.5), "quant": (1, 2, 3, 4, 8)}
with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                  silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
    n_workers = len(client.scheduler_info()["workers"])
    sweeps = {method: sensitivity(task, method, grid, executor=client, progress=False)
              for method, grid in tqdm(grids.items(), desc="sweeps on Dask", total=len(grids))}
print(f"{sum(len(r.layers) for r in sweeps.values())} layer sweeps on {n_workers} Dask workers; cluster {cluster.status.name}")"""),
    md("""Pick a method: one curve per layer, the validation accuracy with only that layer compressed."""),
    code("""sweep_view = SweepView(sweeps)
sweep_view"""),
    code("""weakest = {}
for method in sweeps:
    state = sweep_view.update(method)
    weakest[method] = (state["most_sensitive"], sweeps[method].grid[state["at"]])
    print(f"{method:>5}: at {sweeps[method].option} = {weakest[method][1]:g} the most sensitive layer is {weakest[method][0]}")"""),
    md("""## What you saw"""),
    code("""best_row = l1_table.loc[best]
t256 = timings[256]
Markdown(f\"\"\"
* **L1 training**: plain training left {plain['pruned']:.1%} of the weights under the cut; with L1 = {best:g},
  {best_row['pruned']:.1%} were cut at test accuracy {best_row['accuracy after cut']:.3f}
  (plain: {plain['accuracy after cut']:.3f}).
* **BatchNorm folding**: {len(fold['pairs'])} of {fold['bn_before']} BatchNorms folded, outputs equal within
  {fold['max_abs_diff']:.1e}, {fold['params_before'] - fold['params_after']} parameters fewer; at batch 256 the
  median latency went {t256['original']['median_ms']:.2f} -> {t256['folded']['median_ms']:.2f} ms
  ({verdicts[256]}).
* **Export**: dense ONNX {dense_bytes:,} B; the smallest file was {smallest}
  ({export_table.loc[smallest, 'ONNX / dense']:.0%}); onnxruntime matched torch within
  {export_table['onnxruntime max |diff|'].max():.1e}; no smaller as ONNX: {', '.join(no_gain) or 'none'}.
* **Dask**: {sum(len(r.layers) for r in sweeps.values())} layer sweeps on {n_workers} workers; most sensitive layer
  at the harshest setting: {', '.join(f'{m} {w[0]}' for m, w in weakest.items())}.
\"\"\")"""),
]

nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"}})
Path(__file__).with_name("09_more_techniques.ipynb").write_text(nbformat.writes(nb))
