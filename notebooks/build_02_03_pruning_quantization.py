"""Builds notebooks/02_pruning.ipynb and 03_quantization.ipynb (without outputs):
``python notebooks/build_02_03_pruning_quantization.py``."""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

md, code = new_markdown_cell, new_code_cell
HERE = Path(__file__).parent

pruning = [
    md("""# 02 · Pruning: removing weights, and removing neurons

**Magnitude pruning** bets that small weights matter little: keep the weights with `|w| > t`,
set the rest to zero. Two ways to pick `t`:

- *per layer*: each layer keeps the same fraction `ratio` of its weights;
- *global*: one cut `t` for the whole network, so layers with many small weights lose more.

A zero stored as a float still costs 4 bytes. The workbench stores a pruned layer **sparsely** —
a bitmap (one bit per weight) plus the kept values, or compressed sparse rows when very few
remain — so the file really shrinks. It does *not* make a CPU faster below ~90% sparsity: dense
matrix products are too well tuned. **Structured** pruning removes whole neurons instead, so the
next layer gets narrower and both bytes and time fall."""),
    code("""%matplotlib inline
import pandas as pd

import workbench as wb
from workbench.measure import saved_bytes
from workbench.registry import get_recipe

task = wb.load("digits-mlp")
print(f"original: accuracy {task.evaluate():.3f}, {saved_bytes(task.model):,} bytes")"""),
    md("""## Kept fraction against accuracy and bytes

`get_recipe("prune")` turns options into a `Plan`; `wb.apply` builds a new model (the original is
never touched)."""),
    code("""rows = []
for ratio in (0.5, 0.2, 0.1, 0.05):
    for scope in ("layer", "global"):
        pruned = wb.apply(task.model, get_recipe("prune")(task.model, ratio=ratio, scope=scope))
        rows.append({"kept": ratio, "scope": scope, "accuracy": task.evaluate(pruned), "bytes": saved_bytes(pruned)})
pd.DataFrame(rows)"""),
    md("""Global pruning holds accuracy longer at 80%: its single cut takes more from the wide `fc2`
(about 84% removed) and less from the input layer `fc1` and the classifier `fc3` (about 66%).

## Explore the cut

Move the threshold: the red lines mark `±t` on the weight histogram (everything between them is
pruned), the heatmap shows the fraction removed in each layer, and accuracy and bytes follow.
A cut that would remove every weight of a layer is refused with a message."""),
    code("""from workbench.widgets.pruning import PruningExplorer

explorer = PruningExplorer(task, threshold=0.05)
explorer"""),
    code("""explorer.update(0.1)  # what the slider does
print({name: round(s, 3) for name, s in explorer.state["sparsity"].items()}, explorer.state["metric"])"""),
    md("""## Structured pruning: narrower layers

Removing half the neurons of `fc1` and `fc2` (smallest L1 norm) — Torch-Pruning's dependency
graph also drops the matching input columns of the next layer."""),
    code("""structured = wb.apply(task.model, get_recipe("prune")(task.model, task=task, ratio=0.5, structured=True))
print(structured)
print(f"accuracy {task.evaluate(structured):.3f}, {saved_bytes(structured):,} bytes")"""),
    md("""## Recovering by training: gradual pruning

Pruning all at once hurts; pruning a little, fine-tuning the survivors (pruned weights stay at
exactly zero), and repeating recovers most of it. The schedule is AGP's cubic ramp
`s_t = s_f (1 - (1 - t/n)^3)`: large steps first, small steps near the target."""),
    code("""from workbench.recovery import iterative_pruning

one_shot = wb.apply(task.model, get_recipe("prune")(task.model, ratio=0.05))
run = iterative_pruning(task, ratio=0.05, steps=4, epochs_per_step=2)
print(f"95% sparse: one shot {task.evaluate(one_shot):.3f}, gradual {task.evaluate(run.pruned):.3f}")
pd.DataFrame(run.history)"""),
]

quantization = [
    md("""# 03 · Quantization: fewer bits per weight

A float32 weight costs 32 bits. **Uniform quantization** to `b` bits snaps each weight to a grid
of `2^b` evenly spaced values, `w ≈ scale · (code − zero_point)`, rounding to the nearest one, so
each weight moves by at most `scale / 2`. *Symmetric* grids are centred on zero; *asymmetric*
ones cover `[min, max]`; a *per-channel* grid gives each output neuron its own scale.

**K-means** (weight clustering) lets the data choose the `2^b` values: a codebook of centroids,
dense where the weights are dense. Both store `b`-bit **codes packed** into bytes, so a 4-bit
layer really takes 4 bits a weight plus a few scales."""),
    code("""%matplotlib inline
import pandas as pd

import workbench as wb
from workbench.measure import saved_bytes
from workbench.registry import get_recipe

task = wb.load("digits-mlp")
fp32_bytes = saved_bytes(task.model)
print(f"original: accuracy {task.evaluate():.3f}, {fp32_bytes:,} bytes")"""),
    code("""settings = [(8, "uniform", False), (4, "uniform", False), (4, "uniform", True), (4, "kmeans", False),
            (2, "uniform", False), (2, "uniform", True), (2, "kmeans", False)]
rows = []
for bits, scheme, per_channel in settings:
    plan = get_recipe("quant")(task.model, bits=bits, scheme=scheme, per_channel=per_channel)
    model = wb.apply(task.model, plan)
    rows.append({"bits": bits, "scheme": scheme, "per channel": per_channel,
                 "accuracy": task.evaluate(model), "bytes / fp32": saved_bytes(model) / fp32_bytes})
pd.DataFrame(rows)"""),
    md("""At 4 bits both schemes keep the accuracy at about 1/7 of the bytes. At 2 bits the uniform grid
has only three usable levels (`-s, 0, +s`) and collapses; k-means places its four centroids where
the weights are and holds up much better.

## Explore the grid

The red lines are the representable values over the layer's weight histogram: evenly spaced for
uniform, following the distribution for k-means."""),
    code("""from workbench.widgets.quantization import QuantizationExplorer

explorer = QuantizationExplorer(task, bits=3)
explorer"""),
    md("""## int8: the one that is faster

Packed `b`-bit layers dequantize before a float product: they save bytes, not time. `int8`
uses integer kernels (int8 weights per channel, activations quantized on the fly)."""),
    code("""from workbench.measure import latency_ms

int8 = wb.apply(task.model, get_recipe("int8")(task.model))
batch = task.eval_inputs[:256]
print(f"accuracy {task.evaluate(int8):.3f}, bytes {saved_bytes(int8):,}")
print(f"batch 256: fp32 {latency_ms(task.model, batch):.3f} ms, int8 {latency_ms(int8, batch):.3f} ms")"""),
    md("""On a layer this small the fixed cost of quantizing activations eats most of the gain; on a
1536×384 layer at batch 64 int8 is clearly faster (see `benchmarks/pruning_quant.py`)."""),
]

for name, cells in (("02_pruning.ipynb", pruning), ("03_quantization.ipynb", quantization)):
    notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                  "language": "python"}})
    nbformat.write(notebook, HERE / name)
    print("wrote", HERE / name)
