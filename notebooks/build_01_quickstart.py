"""Builds notebooks/01_quickstart.ipynb (outputs cleared). Run: .venv/bin/python notebooks/build_01_quickstart.py"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# Quickstart: low-rank compression, live

We take a small trained network (`digits-mlp`, a 64-256-256-10 MLP on scikit-learn's 8x8 digits),
look at the singular values of each layer, and then compress it by **truncated SVD** with one rank
slider per layer, watching accuracy, size and FLOPs change as you move them.

**Contents**
1. [Spectra: how much does each layer need?](#Spectra:-how-much-does-each-layer-need?)
2. [Truncated SVD, Eckart–Young and the break-even rank](#Truncated-SVD,-Eckart–Young-and-the-break-even-rank)
3. [One notion of size](#One-notion-of-size)
4. [The dashboard](#The-dashboard)
5. [What the sliders do, measured](#What-the-sliders-do,-measured)
6. [What you saw](#What-you-saw)"""),
    new_code_cell("""%matplotlib inline
import workbench as wb
from workbench.kernels import svd as svd_kernels
from workbench.plotting.spectra import SPECTRUM_FLOOR, spectra_figure, spectra_table
from workbench.spectra import model_spectra

task = wb.load("digits-mlp")
print(task.model)
base_accuracy = task.evaluate()
print(f"test accuracy {base_accuracy:.4f} on {len(task.eval_targets)} images")"""),
    new_markdown_cell("""## Spectra: how much does each layer need?

Every `Linear` weight is a matrix $W$ of shape (out, in). Its singular values
$\\sigma_1 \\ge \\sigma_2 \\ge \\dots$ say how much each direction contributes. The top row shows
$\\sigma_i/\\sigma_1$ (log scale), the bottom row the **energy** kept by the first $r$ of them,
$\\sum_{i\\le r}\\sigma_i^2 / \\sum_i \\sigma_i^2$. A spectrum that falls fast means a layer that a
small rank describes well. The dotted red line is each layer's **break-even rank** (next section):
to its right a truncated SVD no longer saves anything.

**The cut at $10^{-6}$.** The top row stops at $\\sigma_i/\\sigma_1 = 10^{-6}$: below that a value is
the round-off of a direction the layer never uses, not information, and drawing it (down to
$10^{-16}$) would squash the informative part into the top of the panel. The titles count the values
cut; the energy curves use all of them. The cell after the figure shows where they come from."""),
    new_code_cell("""spectra = model_spectra(task.model)
shapes = {name: tuple(task.model.get_submodule(name).weight.shape) for name in ("fc1", "fc2", "fc3")}
break_even = {name: svd_kernels.breakeven_rank(shape) for name, shape in shapes.items()}
spectra_figure(spectra_table(spectra), break_even=break_even).figure"""),
    new_code_cell("""import torch

blank = (task.train_inputs.abs().amax(dim=0) == 0).nonzero().flatten().tolist()
for s in spectra:
    relative = s.singular_values / s.singular_values[0]
    w = task.model.get_submodule(s.name).weight.detach()
    near_zero = (w.abs().amax(dim=0) < SPECTRUM_FLOOR * w.abs().max()).nonzero().flatten().tolist()
    print(f"{s.name}: {int((relative < SPECTRUM_FLOOR).sum())} singular values below {SPECTRUM_FLOOR:g} of the largest; "
          f"{len(near_zero)} input columns with every weight below {SPECTRUM_FLOOR:g} of the largest")
fc1_near_zero = (task.model.fc1.weight.detach().abs().amax(dim=0) < SPECTRUM_FLOOR * task.model.fc1.weight.abs().max())
print(f"pixels blank in every training image: {blank}; fc1's near-zero columns: "
      f"{fc1_near_zero.nonzero().flatten().tolist()}")
assert fc1_near_zero.nonzero().flatten().tolist() == blank  # the claim in the text below
with torch.no_grad():
    silent = torch.relu(task.model.fc1(task.train_inputs)).amax(dim=0) == 0  # fc1 units that never fire
fc2_w = task.model.fc2.weight.detach()
fc2_near_zero = fc2_w.abs().amax(dim=0) < SPECTRUM_FLOOR * fc2_w.abs().max()
print(f"fc2: {int((fc2_near_zero & silent).sum())} of its {int(fc2_near_zero.sum())} near-zero columns take their "
      f"input from one of the {int(silent.sum())} fc1 units that never fire on the training images")"""),
    new_markdown_cell("""A pixel that is blank in every training image gives its weight column no gradient, and weight
decay shrinks that column to almost zero: fc1's near-zero columns are exactly those pixels (the
assert above checks it), and each such column removes one direction from the layer. In fc2 the
same happens to inputs from fc1 units that never fire (the last line counts them).

## Truncated SVD, Eckart–Young and the break-even rank

Write $W = U \\Sigma V^\\top$ and keep only the first $r$ singular triplets:
$W_r = U_r \\Sigma_r V_r^\\top$. The **Eckart–Young theorem** says no rank-$r$ matrix is closer
to $W$ in Frobenius norm, and the error is exactly what was dropped:
$\\lVert W - W_r \\rVert_F = \\sqrt{\\sum_{i>r} \\sigma_i^2}$.

**Why the layer gets smaller.** The workbench does not rebuild the dense $W_r$ (that would be the
same size). It stores the two factors $A = U_r\\Sigma_r^{1/2}$ (out x r) and
$B = \\Sigma_r^{1/2} V_r^\\top$ (r x in) as two real `Linear` layers, $x \\mapsto A(Bx)$: that is
$r\\,(\\text{out}+\\text{in})$ weights instead of $\\text{out}\\cdot\\text{in}$, and as many
multiply-adds. The **break-even rank** is the largest $r$ with
$r\\,(\\text{out}+\\text{in}) < \\text{out}\\cdot\\text{in}$; above it the two factors are *larger*
than the dense layer. The check below compares the measured error with the formula."""),
    new_code_cell("""w = task.model.fc2.weight.detach()
a, b = svd_kernels.truncate(w, 32)
measured_error = float((w - a @ b).norm())
predicted = svd_kernels.truncation_error(spectra[1].singular_values, 32)
print(f"fc2 rank 32: measured ||W - AB||_F = {measured_error:.5f}, predicted sqrt(sum dropped sigma^2) = {predicted:.5f}")
print(f"fc2 weights: dense {w.numel():,} -> factors {a.numel() + b.numel():,}")
for name, (out, inp) in shapes.items():
    r = break_even[name]
    print(f"{name} ({out}x{inp}): break-even rank {r} ({r * (out + inp):,} factor weights < {out * inp:,} dense); "
          f"rank {r + 1} already holds {(r + 1) * (out + inp):,}")
assert abs(measured_error - predicted) < 1e-3 * predicted  # Eckart-Young, as stated above"""),
    new_markdown_cell("""## One notion of size

Three numbers can describe "the size" of a model, and this notebook uses one of them:

- the **tensor payload**: $\\sum$ numel $\\times$ element size over the state dict, each shared
  tensor once. It is what the dashboard's readouts (*total size*, *bytes*) and its chart axis
  (*estimated size (KiB)*, the same number in KiB) show: it is computed without building or
  writing the model, which is what lets the readouts follow the slider;
- the **file bytes**: the state dict really written by `torch.save` (`workbench.measure.saved_bytes`,
  what `wb.measure` and notebooks 02 and 03 report): the payload plus the file's container
  (tensor names, the pickled structure, zip headers), a roughly constant few KiB;
- *estimated bytes* are not a third quantity: it is the payload, called an estimate because it
  leaves the container out.

The cell below measures both for the original and for one compressed plan."""),
    new_code_cell("""from workbench.engine import Engine
from workbench.measure import saved_bytes
from workbench.ties import payload_bytes

engine = Engine(task)
example_plan = wb.Plan({"fc1": wb.LayerPlan("svd", {"rank": 10}), "fc2": wb.LayerPlan("svd", {"rank": 20})})
for label, plan in (("original", wb.Plan({})), ("fc1 rank 10, fc2 rank 20", example_plan)):
    result = engine.evaluate(plan, file_bytes=True)
    payload, file = result["bytes"], result["bytes_file"]
    assert payload == payload_bytes(wb.apply(task.model, plan).state_dict())
    print(f"{label}: payload {payload:,} B ({payload / 1024:,.1f} KiB), file {file:,} B "
          f"= payload + {file - payload:,} B of container ({(file - payload) / file:.1%} of the file)")"""),
    new_markdown_cell("""## The dashboard

One slider per layer. Every slider has **dense at its right end** (its maximum, `min(out, in)`,
keeps the layer as it is); moving left lowers the rank. Between the break-even rank printed above
(fc1 51, fc2 127, fc3 9; the cell after the dashboard checks these) and the right end the factors are *larger than dense*: the
*total size* readout then shows more than 100% of the original. Each move evaluates the compressed
model on all 360 test images: the engine slices SVD factors computed once and re-runs the network
only from the changed layer on, so the readouts follow the hand. The italic line is an instant
preview (no forward pass): the layer's weight error and its output error on its cached inputs.
The chart places the current setting (red) against using the same kept ratio in every layer (grey);
its size axis is the tensor payload in KiB."""),
    new_code_cell("""from workbench.widgets import Dashboard

dashboard = Dashboard(task)
dashboard"""),
    new_code_cell("""# the break-even ranks quoted in the text above, as the kernel computes them
assert break_even == {"fc1": 51, "fc2": 127, "fc3": 9}, break_even"""),
    new_markdown_cell("""## What the sliders do, measured

Rather than tell you what happens, the next cell measures it with the dashboard's own engine (the
sliders do not move): `fc1` and `fc2` lowered together, then every rank of `fc3` with the others
dense. The sentences are built from the numbers printed."""),
    new_code_cell("""import pandas as pd

dense = {knob.layer: knob.maximum for knob in dashboard.knobs}
base = dashboard.engine.evaluate(dashboard.plan_for(dense))

def evaluated(**ranks):
    result = dashboard.engine.evaluate(dashboard.plan_for({**dense, **ranks}))
    return {"accuracy": result["metric"], "size / original": result["bytes"] / base["bytes"]}

low = pd.DataFrame({f"fc1 {r1}, fc2 {r2}": evaluated(fc1=r1, fc2=r2) for r1, r2 in ((8, 16), (10, 20), (12, 24))}).T
print(low.round(4))
fc3 = pd.DataFrame({r: evaluated(fc3=r) for r in range(1, 11)}).T.rename_axis("fc3 rank")
fc3_weight = task.model.fc3.weight.detach()
fc3["weight error"] = [svd_kernels.truncation_error(spectra[2].singular_values, r) / float(fc3_weight.norm())
                       for r in fc3.index]
print(fc3.round(4))

pick = low.loc["fc1 10, fc2 20"]
print(f"fc1 10 and fc2 20: accuracy {pick['accuracy']:.3f} (original {base['metric']:.3f}, "
      f"{pick['accuracy'] - base['metric']:+.3f}) at {pick['size / original']:.0%} of the original size.")
close = base["metric"] - 0.01
steady = min(r for r in fc3.index if (fc3.loc[r:, "accuracy"] >= close).all())
print(f"fc3: accuracy stays within 0.01 of the original from rank {steady} up, and is "
      f"{fc3.loc[1, 'accuracy']:.3f} at rank 1 (10 classes, one direction left).")
assert fc3["weight error"].is_monotonic_decreasing  # Eckart-Young: the weight error falls with every rank
for r in range(1, 10):
    if fc3.loc[r, "accuracy"] > fc3.loc[r + 1, "accuracy"]:
        print(f"Not monotone: fc3 at rank {r} scores {fc3.loc[r, 'accuracy']:.3f}, above rank {r + 1} "
              f"({fc3.loc[r + 1, 'accuracy']:.3f}), although its weight error is larger "
              f"({fc3.loc[r, 'weight error']:.3f} against {fc3.loc[r + 1, 'weight error']:.3f}): accuracy counts "
              "argmax decisions, and a smaller weight error need not flip more of them the right way.")"""),
    new_markdown_cell("""Try it on the sliders above: each setting in the tables gives the same readout there. To share
this page as a web app: `voila notebooks/01_quickstart.ipynb`.

## What you saw"""),
    new_code_cell("""from IPython.display import Markdown

energy90 = {s.name: svd_kernels.rank_for_energy(s.singular_values, 0.9) for s in spectra}
cut = sum(int((s.singular_values / s.singular_values[0] < SPECTRUM_FLOOR).sum()) for s in spectra)
good = low[low["accuracy"] >= close]
lowered = (f"kept accuracy within 0.01 of the original ({base['metric']:.3f}) down to "
           f"{good['size / original'].min():.0%} of the size" if len(good) else
           f"lost more than 0.01 of accuracy at every setting tried (best {low['accuracy'].max():.3f})")
Markdown(f\"\"\"- **Spectra.** 90% of the energy sits in the first {energy90['fc1']} of fc1's 64 values,
  {energy90['fc2']} of fc2's 256 and {energy90['fc3']} of fc3's 10; {cut} values below
  {SPECTRUM_FLOOR:g} of the largest are directions the layers never use, cut from the plot.
- **Eckart–Young** held to {abs(measured_error - predicted):.1e}: the truncation error is exactly what was dropped.
- **Break-even ranks** fc1 {break_even['fc1']}, fc2 {break_even['fc2']}, fc3 {break_even['fc3']}: above
  them the factors are larger than the dense layer, and the dashboard's size passes 100%.
- **Size** is the tensor payload; the written file adds a few KiB of container.
- **Measured:** lowering fc1 and fc2 together {lowered}; fc3 stays within 0.01 from rank
  {steady} up and falls to {fc3.loc[1, 'accuracy']:.3f} at rank 1.\"\"\")"""),
]

notebook = new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
    "language_info": {"name": "python"},
})
path = Path(__file__).with_name("01_quickstart.ipynb")
nbformat.write(notebook, path)
print(f"wrote {path}")
