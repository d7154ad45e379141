"""Builds notebooks/06_choosing.ipynb (outputs cleared). Run: .venv/bin/python notebooks/build_06_choosing.py"""
from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# 06 · Choosing a method\n\n"
       "Which layers tolerate compression, how to split a budget between layers, and which method to pick. "
       "Every number below is **measured** on `digits-mlp`: each choice is applied to a copy of the model "
       "and evaluated. Choices are made on a validation split carved from the *training* data; the test "
       "split is only used to report (that validation split overlaps what the model was trained on, so the "
       "baseline there reads 1.0).\n\n"
       "**Contents**\n"
       "1. [Sensitivity: one layer at a time](#1.-Sensitivity:-one-layer-at-a-time)\n"
       "2. [Allocation under a budget](#2.-Allocation-under-a-budget-(30%-of-parameters)) and "
       "[one byte budget across every family](#2b.-One-byte-budget-across-every-family:-a-live-slider)\n"
       "3. [Convex constrained compression](#3.-Convex-constrained-compression)\n"
       "4. [A small architecture search](#4.-A-small-architecture-search)\n"
       "5. [One Pareto chart, and an advisor](#5.-One-Pareto-chart,-and-an-advisor)\n"
       "6. [What you saw](#What-you-saw)"),
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
         "KEPT = 'kept ratio (fraction of the layer\\'s weights)'\n"
         "fig, (a, b) = plt.subplots(1, 2, figsize=(13, 3.8), width_ratios=(1, 1.3), layout='constrained')\n"
         "draw.draw_sensitivity_curves(a, sens.grid, sens.metric, sens.layers, sens.baseline, xlabel=KEPT,\n"
         "                             ylabel='validation accuracy')\n"
         "draw.draw_sensitivity_heatmap(b, sens.grid, sens.metric, sens.layers, sens.baseline, xlabel=KEPT,\n"
         "                              higher_is_better=sens.higher_is_better);"),
    md("The same analysis works for every registered per-layer recipe: pruning (kept fraction of the "
       "weights) and quantization (bits per weight) below. Which layer breaks first is read from the curves: "
       "the cell after the chart names, per method, the layer that falls more than 2 points below the "
       "original at the *mildest* setting."),
    code("XLABELS = {'prune': 'kept fraction of the weights', 'quant': 'bits per weight'}\n"
         "curves = {'svd': sens}\n"
         "fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), layout='constrained')\n"
         "for ax, (method, grid) in zip(axes, (('prune', (0.05, 0.1, 0.2, 0.4, 0.7)), ('quant', (1, 2, 3, 4, 8)))):\n"
         "    s = curves[method] = sensitivity(task, method, grid, progress=False)\n"
         "    draw.draw_sensitivity_curves(ax, s.grid, s.metric, s.layers, s.baseline, xlabel=XLABELS[method],\n"
         "                                 ylabel='validation accuracy')\n"
         "    ax.set_title(f'{method}: {s.option}')"),
    code("def first_to_break(s, drop=0.02):\n"
         "    \"\"\"{layer: the mildest setting (largest kept ratio or bits) where it falls `drop` below the original}.\"\"\"\n"
         "    out = {}\n"
         "    for layer, row in zip(s.layers, s.metric):\n"
         "        broken = [g for g, m in zip(s.grid, row) if m < s.baseline - drop]\n"
         "        out[layer] = max(broken) if broken else None\n"
         "    return out\n\n"
         "breaks = {}\n"
         "for method, s in curves.items():\n"
         "    at = first_to_break(s)\n"
         "    mildest = max(v for v in at.values() if v is not None)\n"
         "    breaks[method] = [layer for layer, v in at.items() if v == mildest]  # ties: all of them\n"
         "    print(f\"{method:5s}: first to break {' and '.join(breaks[method])} (at {s.option} {mildest:g}); all: {at}\")\n"
         "q = curves['quant']\n"
         "odd = [layer for layer, row in zip(q.layers, q.metric) if row[q.grid.index(1)] > row[q.grid.index(2)]]\n"
         "print('layers scoring higher at 1 bit than at 2 bits:', odd or 'none')\n"
         "assert breaks['svd'] == ['fc3'] and odd, 'the text below describes another run: update it'"),
    md("Two things to read there. **`fc3` breaks first under SVD** although it is the smallest layer: it "
       "maps 256 features onto 10 classes, and every one of its few directions carries a class, so cutting "
       "its rank removes classes outright; `fc1` and `fc2` have long tails of weak directions. **1 bit can "
       "score above 2 bits** (the layers listed): the uniform 2-bit grid takes its range from the largest "
       "weight, so its levels sit at about -max, 0 and +max (the fourth level unused by a symmetric grid) "
       "and almost every weight rounds to 0, while the 1-bit grid is two signed levels scaled to the "
       "weights' mean magnitude, which keeps every weight's sign. Notebook 03 shows the grids."),
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
         "draw.draw_ranks_on_spectra(ax, spectra, {k: r.ranks for k, r in results.items()}, floor=1e-6);\n"
         "print('singular values below 1e-6 of the largest (not drawn):',\n"
         "      {name: int((s < 1e-6 * s[0]).sum()) for name, s in spectra.items()})"),
    md("The spectra stop at 1e-6 of each layer's largest singular value. Below that are numerical zeros, not "
       "information: the 8x8 digits have blank border pixels, input columns that are always zero, so `fc1`'s "
       "weights on them never trained and its matrix has exactly that many zero singular values (SVD returns "
       "them as ~1e-16); the counts above show the other layers' share. Drawn on a log axis they would squash every "
       "informative value into the top fifth of the chart."),
    code("for k, r in results.items():\n"
         "    dense = [layer for layer, rank in r.ranks.items() if rank is None]\n"
         "    print(f'{k:8s} test accuracy {r.metric:.3f}; ranks {r.ranks}; dense: {dense or \"none\"}')\n"
         "worst, best = min(results, key=lambda k: results[k].metric), max(results, key=lambda k: results[k].metric)\n"
         "print(f'lowest: {worst} ({results[worst].metric:.3f}); highest: {best} ({results[best].metric:.3f})')\n"
         "assert worst == 'uniform' and all(results[k].ranks['fc3'] is None for k in ('greedy', 'convex')), 'update the text'"),
    md("**What the measurements say** (the lines above). The uniform ratio gives `fc3` (10 outputs, 3% of the "
       "weights) a rank of 2 or so, and accuracy collapses: the *assumption* of uniform allocation (every layer "
       "equally redundant) is false. The energy rule assumes sigma^2 kept predicts accuracy; it gives `fc3` "
       "more rank and loses less. Greedy and convex assume the per-layer losses *add up*; here that holds "
       "well enough that both keep `fc3` dense and spend the cut on the large, redundant `fc2`."),
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
       "built, saved and timed for real; the ringed points form the Pareto front. Colours are the method "
       "*families* (`family_of`), so the legend stays short. Latency is the median of 5 runs after 2 warm-up "
       "runs on a shared CPU: treat differences under ~2x as noise."),
    code("from workbench.select.pareto import collect_points, pareto_front, advise\n"
         "cnn = wb.load('digits-cnn')\n"
         "found_cnn = search('cnn', 40_000, population=3, generations=1, epochs=4, progress=False)\n"
         "points, skipped = collect_points(cnn, allocations=(0.3,), recovery_epochs=1, latency_repeats=5,\n"
         "                                 search_results=found_cnn, progress=False)\n"
         "from workbench.select.pareto import family_of\n"
         "AXES = {'bytes': 'saved file size (bytes, log scale)',\n"
         "        'latency_ms': 'CPU latency, batch 1 (ms, median of 5 runs, log scale)'}\n"
         "fig, axes = plt.subplots(1, 2, figsize=(14, 5), layout='constrained')\n"
         "for ax, x in zip(axes, ('bytes', 'latency_ms')):\n"
         "    on = {id(p) for p in pareto_front(points, x)}\n"
         "    draw.draw_pareto(ax, [getattr(p, x) for p in points], [p.metric for p in points], [p.label for p in points],\n"
         "                     [family_of(p) for p in points], [id(p) in on for p in points], xlabel=AXES[x],\n"
         "                     ylabel='test accuracy')\n"
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
    md("## What you saw\n\nComputed from the results above, in this run."),
    code("print(*(f\"* Under {m}, {' and '.join(v)} break(s) first.\" for m, v in breaks.items()), sep='\\n')\n"
         "print(f\"* At 30% of the parameters: {', '.join(f'{k} {r.metric:.3f}' for k, r in results.items())} test accuracy.\")\n"
         "plain = budget.readouts['metric'].value.replace('<b>', '').replace('</b>', '')\n"
         "print(f'* The byte-budget slider at 6% of the bytes: {plain}')\n"
         "summary = family_summary(points, within=0.01)\n"
         "for row in summary:\n"
         "    kept = (f\"smallest within 1 point of the original: {row['smallest within']} at {row['of original']:.0%} of its bytes\"\n"
         "            if row['smallest within'] else 'nothing within 1 point of the original')\n"
         "    print(f\"* {row['family']}: best {row['best metric']:.3f} ({row['best']}); {kept}\")"),
    md("## Sweeps on a cluster\n\n`sensitivity(..., executor=...)` and `search(..., executor=...)` accept "
       "`'processes'`, any `concurrent.futures.Executor`, or a `dask.distributed.Client` "
       "(`Client('tcp://scheduler:8786')`): the result equals the serial one."),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
Path(__file__).with_name("06_choosing.ipynb").write_text(nbf.writes(nb))
