"""Builds notebooks/01_quickstart.ipynb (outputs cleared). Run: .venv/bin/python notebooks/build_01_quickstart.py"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# Quickstart: low-rank compression, live

We take a small trained network (`digits-mlp`, a 64-256-256-10 MLP on scikit-learn's 8x8 digits),
look at the singular values of each layer, and then compress it by **truncated SVD** with one rank
slider per layer, watching accuracy, size and FLOPs change as you move them."""),
    new_code_cell("""%matplotlib inline
import workbench as wb
from workbench.plotting.spectra import spectra_figure, spectra_table
from workbench.spectra import model_spectra

task = wb.load("digits-mlp")
print(task.model)
print(f"test accuracy {task.evaluate():.4f} on {len(task.eval_targets)} images")"""),
    new_markdown_cell("""## Spectra: how much does each layer need?

Every `Linear` weight is a matrix $W$ of shape (out, in). Its singular values
$\\sigma_1 \\ge \\sigma_2 \\ge \\dots$ say how much each direction contributes. The top row shows
$\\sigma_i/\\sigma_1$ (log scale), the bottom row the **energy** kept by the first $r$ of them,
$\\sum_{i\\le r}\\sigma_i^2 / \\sum_i \\sigma_i^2$. A spectrum that falls fast means a layer that a
small rank describes well."""),
    new_code_cell("""spectra = model_spectra(task.model)
spectra_figure(spectra_table(spectra)).figure"""),
    new_markdown_cell("""## Truncated SVD and Eckart–Young

Write $W = U \\Sigma V^\\top$ and keep only the first $r$ singular triplets:
$W_r = U_r \\Sigma_r V_r^\\top$. The **Eckart–Young theorem** says no rank-$r$ matrix is closer
to $W$ in Frobenius norm, and the error is exactly what was dropped:
$\\lVert W - W_r \\rVert_F = \\sqrt{\\sum_{i>r} \\sigma_i^2}$.

**Why the layer gets smaller.** The workbench does not rebuild the dense $W_r$ (that would be the
same size). It stores the two factors $A = U_r\\Sigma_r^{1/2}$ (out x r) and
$B = \\Sigma_r^{1/2} V_r^\\top$ (r x in) as two real `Linear` layers, $x \\mapsto A(Bx)$: that is
$r\\,(\\text{out}+\\text{in})$ weights instead of $\\text{out}\\cdot\\text{in}$, and as many
multiply-adds. For `fc2` (256 x 256) rank 32 keeps 16,384 of 65,536 weights; above rank 127 the
factors would be *larger* than the dense layer. The check below compares the measured error with
the formula."""),
    new_code_cell("""from workbench.kernels import svd as svd_kernels

w = task.model.fc2.weight.detach()
a, b = svd_kernels.truncate(w, 32)
print("measured  ||W - AB||_F =", float((w - a @ b).norm()))
print("predicted sqrt(sum dropped sigma^2) =", svd_kernels.truncation_error(spectra[1].singular_values, 32))
print("weights: dense", w.numel(), "-> factors", a.numel() + b.numel())"""),
    new_markdown_cell("""## The dashboard

One slider per layer (at its maximum the layer stays dense). Each move evaluates the compressed
model on all 360 test images: the engine slices SVD factors computed once and re-runs the network
only from the changed layer on, so the readouts follow the hand. The italic line is an instant
preview (no forward pass): the layer's weight error and its output error on its cached inputs.
The chart places the current setting (red) against using the same kept ratio in every layer (grey).
*Bytes* here is the tensor payload of the state dict; `wb.measure` writes the real file."""),
    new_code_cell("""from workbench.widgets import Dashboard

dashboard = Dashboard(task)
dashboard"""),
    new_markdown_cell("""Try: lower `fc1` to ~10 (its input is only 64 pixels wide) and `fc2` to ~20 — accuracy
barely moves while the size drops by more than half. Then push `fc3` below 9 and watch accuracy
fall: the last layer has only 10 outputs and every direction matters.

To share this page as a web app: `voila notebooks/01_quickstart.ipynb`."""),
]

notebook = new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
    "language_info": {"name": "python"},
})
path = Path(__file__).with_name("01_quickstart.ipynb")
nbformat.write(notebook, path)
print(f"wrote {path}")
