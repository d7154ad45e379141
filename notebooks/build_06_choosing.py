"""Builds notebooks/06_choosing.ipynb (outputs cleared). Run: .venv/bin/python notebooks/build_06_choosing.py"""
from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# 06 · Choosing a method\n\n"
       "Which layers tolerate compression, how to split a budget between layers, and which method to pick. "
       "Every number below is **measured** on `digits-mlp`: each choice is applied to a copy of the model "
       "and evaluated. Choices are made on a validation split carved from the *training* data; the test "
       "split is only used to report."),
    code("%matplotlib inline\nimport matplotlib.pyplot as plt\nimport pandas as pd\nimport workbench as wb\n"
         "from workbench.registry import recipes\n"
         "from workbench.select import sensitivity\n"
         "from workbench.select import ALLOCATION_GRID, compare_allocators\n"
         "from workbench.plotting import selection as draw\n\n"
         "task = wb.load('digits-mlp')\nprint('methods registered:', recipes())"),
    md("## 1. Sensitivity: one layer at a time\n\n"
       "Distiller-style: compress **one** layer along a grid of kept ratios, leave the others intact, "
       "and score. A flat curve means the layer tolerates compression; a cliff means it does not."),
    code("sens = sensitivity(task, 'svd', ALLOCATION_GRID, progress=False)  # cached: the allocators reuse it\n"
         "fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))\n"
         "draw.draw_sensitivity_curves(a, sens.grid, sens.metric, sens.layers, sens.baseline)\n"
         "draw.draw_sensitivity_heatmap(b, sens.grid, sens.metric, sens.layers, sens.baseline, higher_is_better=sens.higher_is_better);"),
    md("The same analysis works for every registered per-layer recipe: pruning (kept fraction of the "
       "weights) and quantization (bits) below. `fc1` sees the raw pixels and is the first to break under "
       "all three methods; `fc2`, the largest layer, tolerates the most."),
    code("fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))\n"
         "for ax, (method, grid) in zip(axes, (('prune', (0.05, 0.1, 0.2, 0.4, 0.7)), ('quant', (1, 2, 3, 4, 8)))):\n"
         "    s = sensitivity(task, method, grid, progress=False)\n"
         "    draw.draw_sensitivity_curves(ax, s.grid, s.metric, s.layers, s.baseline)\n"
         "    ax.set_title(f'{method}: {s.option}')"),
    md("## 2. Allocation under a budget (30% of parameters)\n\n"
       "* **uniform**: the same kept ratio everywhere; **energy**: keep the same fraction of sigma^2 everywhere;\n"
       "* **greedy** (AIMET-style): take the cheapest cut per parameter saved, using the curves above;\n"
       "* **convex**: a multiple-choice knapsack solved exactly (MILP, HiGHS via cvxpy)."),
    code("results = compare_allocators(task, 0.3, 'params', progress=False)\n"
         "pd.DataFrame([{'allocator': k, 'test accuracy': r.metric, 'params used': r.fraction_used, **r.ranks}\n"
         "              for k, r in results.items()])"),
    code("from workbench.spectra import model_spectra\n"
         "spectra = {s.name: s.singular_values.numpy() for s in model_spectra(task.model)}\n"
         "fig, ax = plt.subplots(figsize=(7, 3.5))\n"
         "draw.draw_ranks_on_spectra(ax, spectra, {k: r.ranks for k, r in results.items()});"),
    md("**What the measurements say.** A uniform ratio gives `fc3` (10 outputs, 3% of the weights) rank 2, "
       "and accuracy collapses: the *assumption* of uniform allocation — every layer equally redundant — is "
       "false. The energy rule assumes sigma^2 kept predicts accuracy; it protects `fc3` partly. Greedy and "
       "convex assume the per-layer losses *add up*; here that holds well enough to keep the small, sensitive "
       "layers dense and cut the large, redundant `fc2`."),
    md("## 2b. One byte budget across every family: a live slider\n\n"
       "Each layer gets a menu of options (dense, b-bit codes, GPTQ codes, ranks, pruned weights), each with its "
       "exact bytes and its measured output error; choosing one option per layer so that the bytes fit the budget "
       "and the summed error is least is a *multiple-choice knapsack*, solved exactly as a MILP (HiGHS via cvxpy). "
       "The menu is built once; every slider move re-solves the knapsack (milliseconds) and evaluates the pick "
       "on the test data. The chart draws each family's front and the joint allocator's (black stars); the red "
       "diamond is the current pick. A budget below the smallest reachable model shows a message and keeps the "
       "last pick. (Notebook 07's MiniLM is left out: its menu takes too long for the CI.)"),
    code("budget = wb.BudgetExplorer(task, families=('quant', 'gptq', 'svd', 'prune'), by='bytes', budget=0.1)\n"
         "budget"),
    code("budget.set_budget(0.06)  # what moving the slider does\n"
         "print(budget.readouts['fraction'].value, budget.readouts['metric'].value, budget.error.value or 'ok', sep='\\n')"),
    md("## 3. Convex constrained compression\n\n"
       "Refit a layer with cvxpy: min ||X W^T - Y||^2 subject to an L1 ball, threshold, least squares on the "
       "support — against plain magnitude pruning at the same sparsity."),
    code("from workbench.select.constrained import compare_on_layer\n"
         "from workbench.report.logistic_study import logistic_study\n"
         "print(compare_on_layer(task, 'fc3', 0.8, n_inputs=256))\n"
         "rows = []\n"
         "for dataset, kept in (('iris', (0.5, 0.75)), ('classification', (0.25, 0.5))):\n"
         "    study = logistic_study(dataset, kept=kept)\n"
         "    rows += [{'data': f\"{dataset} {study['shape']}\", 'before': round(study['before']['test'], 3), 'kept': r['kept'],\n"
         "              **{f'{k} test': (r[k] or {}).get('test') for k in ('low_rank', 'magnitude', 'convex')}}\n"
         "             for r in study['rows']]\n"
         "pd.DataFrame(rows)"),
    md("The refit assumes the calibration inputs represent the data: it cuts the output error on them "
       "by an order of magnitude. Low rank assumes a decaying spectrum; a 3x4 logistic matrix has none to "
       "exploit, and even rank 1 (7 numbers) does not fit a budget of 6. On the 4x20 `make_classification` "
       "problem rank 1 fits half the budget but keeps only one direction (0.51 test accuracy), while the "
       "constrained refit of 40 kept weights matches the uncompressed 0.84."),
    md("## 4. A small architecture search\n\nTrain small MLPs from scratch under the same parameter budget."),
    code("from workbench.select import search\n"
         "found = search('mlp', 25_500, population=3, generations=0, epochs=6, progress=False)\n"
         "pd.DataFrame(found)[['label', 'params', 'validation', 'test']]"),
    md("## 5. One Pareto chart, and an advisor\n\nEvery registered method at a few settings, combinations "
       "(SVD then int8 or 4-bit codes, structured pruning then int8), the greedy allocation, distillation "
       "and searched architectures, on **digits-cnn**: the model where every family applies (Tucker, CP "
       "and spatial SVD need convolutions; int8 and low rank work on its Linear layers too). Each point is "
       "built, saved and timed for real; the ringed points form the Pareto front."),
    code("from workbench.select.pareto import collect_points, pareto_front, advise\n"
         "cnn = wb.load('digits-cnn')\n"
         "found_cnn = search('cnn', 40_000, population=3, generations=1, epochs=4, progress=False)\n"
         "points, skipped = collect_points(cnn, allocations=(0.3,), recovery_epochs=1, latency_repeats=5,\n"
         "                                 search_results=found_cnn, progress=False)\n"
         "fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))\n"
         "for ax, x in zip(axes, ('bytes', 'latency_ms')):\n"
         "    on = {id(p) for p in pareto_front(points, x)}\n"
         "    draw.draw_pareto(ax, [getattr(p, x) for p in points], [p.metric for p in points], [p.label for p in points],\n"
         "                     [p.method for p in points], [id(p) in on for p in points], xlabel=x)\n"
         "print('skipped:', [row['label'] for row in skipped])"),
    code("print(advise(points, max_bytes=120_000).reason)\nprint()\nprint(advise(points, min_metric=0.97).reason)"),
    md("## What each method assumes, and what the chart says about it\n\n"
       "The table below is computed from the points above: for each family, its best accuracy and the "
       "smallest file it made within one point of the original."),
    code("from workbench.select.pareto import family_summary\n"
         "pd.DataFrame(family_summary(points, within=0.01))"),
    md("* **Low rank (SVD, Tucker, CP, spatial SVD)** assumes a decaying spectrum. The same ratio in every layer "
       "breaks the small layers first; allocated ranks (the greedy point) keep accuracy at a third of the "
       "weights. The conv decompositions save FLOPs more than bytes here: the convs hold 12% of the weights.\n"
       "* **Unstructured pruning** assumes many small weights do not matter: accuracy holds at half the "
       "weights, and the file shrinks, but the sparse layers are not faster on a CPU.\n"
       "* **Structured pruning** removes whole channels: smaller *and* faster, but each removed channel "
       "takes its information with it, so it needs fine-tuning (notebook 05).\n"
       "* **Quantization** assumes the weights fit a few levels. 8 and 4 bits cost almost nothing in "
       "accuracy; k-means places its levels where the weights are and still keeps ~0.94 at 2 bits. Packed codes save "
       "bytes; only int8 kernels also save time.\n"
       "* **Distillation and search** assume the task needs less capacity than the model has: a small "
       "network trained for a few epochs is fastest, but these short runs have not reached the accuracy "
       "of compressing the trained model (see notebook 05 for longer ones)."),
    md("## Sweeps on a cluster\n\n`sensitivity(..., executor=...)` and `search(..., executor=...)` accept "
       "`'processes'`, any `concurrent.futures.Executor`, or a `dask.distributed.Client` "
       "(`Client('tcp://scheduler:8786')`): the result equals the serial one."),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
Path(__file__).with_name("06_choosing.ipynb").write_text(nbf.writes(nb))
