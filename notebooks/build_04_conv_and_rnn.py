"""Builds notebooks/04_conv_and_rnn.ipynb (without outputs): ``python notebooks/build_04_conv_and_rnn.py``."""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

md, code = new_markdown_cell, new_code_cell

cells = [
    md("""# 04 · Convolutions and recurrent networks

Two layer types do not fit the "one weight matrix" picture of notebook 01:

* a **convolution** holds a 4-D kernel `(out, in, kh, kw)`;
* a **GRU/LSTM** holds stacked gate matrices that are applied **at every time step**.

This notebook decomposes both, with sliders, and shows accuracy, parameters, FLOPs and measured
CPU latency live. All the logic lives in `workbench`; cells only call it."""),
    code("""%matplotlib inline
import torch
import workbench as wb
from workbench.kernels import tensor as tk
from workbench.registry import get_recipe
from workbench.widgets.conv_rnn import GateRankExplorer, TuckerExplorer

torch.manual_seed(0)
cnn = wb.load("digits-cnn")
kernel = cnn.model.conv2.weight.detach()
print("conv2 kernel:", tuple(kernel.shape))"""),
    md("""## Why 4-D kernels need tensor decompositions

Plain SVD must first flatten the kernel to a matrix `(out, in*kh*kw)`: it then treats the 9
spatial taps of every input channel as unrelated columns, and its first factor is still a full
`kh x kw` convolution. The kernel really has **four modes**, each with its own redundancy:

* **Tucker-2** compresses only the channel modes: `1x1 (in -> r_in)` -> `kh x kw core (r_in -> r_out)`
  -> `1x1 (r_out -> out)`. Weights `in*r_in + r_out*r_in*kh*kw + r_out*out`.
* **CP** writes the kernel as a sum of `R` rank-one 4-way terms: `1x1` -> `kh x 1` depthwise ->
  `1 x kw` depthwise -> `1x1`. Weights `R*(in + kh + kw + out)`: the fewest, but ALS fitting is
  harder and the accuracy drop is usually the largest.
* **Spatial SVD** separates the vertical and horizontal taps: `kh x 1 (in -> R)` then `1 x kw (R -> out)`.

Each is a real sequence of smaller convolutions (the same stride, padding and dilation). The
spectra of the two channel unfoldings tell where Tucker can cut; VBMF gives a starting point."""),
    code("""for mode, label in ((0, "output channels"), (1, "input channels")):
    s = tk.unfolding_spectrum(kernel, mode)
    print(f"{label:16s} first singular values", [round(float(v), 2) for v in s[:8]])
print("VBMF starting ranks (rank_out, rank_in):", tk.tucker_ranks_vbmf(kernel))
print("ranks keeping 90% energy:", tk.tucker_ranks_for_energy(kernel, 0.9))
for method in ("tucker", "spatial-svd"):
    plan = get_recipe(method)(cnn.model, ratio=0.5, layers=["conv2"])
    print(method, dict(plan.layers["conv2"].params), "accuracy", round(cnn.evaluate(wb.apply(cnn.model, plan)), 3))"""),
    md("""### Tucker ranks of `conv2`, live

Move the sliders: the table compares the compressed model with the original (accuracy on the
test split, stored parameters, FLOPs counted by `torch.utils.flop_counter`, median CPU latency
for one sample, timed when you press "measure latency"). On a model this small, latency is dominated by per-layer overhead: three small
convs can be *slower* than one, even with fewer FLOPs."""),
    code("""tucker = TuckerExplorer(cnn, "conv2", rank_out=24, rank_in=12)
tucker"""),
    md("""## Recurrent weights are reused at every step

A GRU computes, for each step `t`, `W_ih x_t` (three gates: reset, update, new) and
`W_hh h_{t-1}`. The input part can be batched over all steps, but the hidden part runs
**sequentially, once per step**: over a sequence of `T` steps the `W_hh` FLOPs are paid `T`
times. Factorizing `W_hh` at rank `r` turns `3H*H` multiply-adds per step into `r*(3H + H)`
(stacked) or `3*r*2H` (per gate), and that saving is multiplied by `T`.

`digits-gru` reads an 8x8 image as 8 rows (`T = 8`, hidden 64)."""),
    code("""gru = wb.load("digits-gru")
rnn = gru.model.rnn
T, H, I = 8, rnn.hidden_size, rnn.input_size
print("dense FLOPs per sequence: input", 2 * T * 3 * H * I, "hidden", 2 * T * 3 * H * H)
print("hidden FLOPs at rank 16 per gate:", 2 * T * 3 * 16 * (H + H), "(x T =", T, "steps)")"""),
    md("""### Rank sliders for the gates, with each gate's spectrum

The gates are stored separately (*per gate*: one factorization per gate) or as one stacked
matrix. The spectra below are drawn **per gate** because gates often differ: a gate whose
spectrum falls fast loses little at low rank. Rank 0 keeps that matrix dense."""),
    code("""gates = GateRankExplorer(gru, "rnn", rank_ih=3, rank_hh=16, per_gate=True)
gates"""),
    code("""# what a slider move does, without the widget:
gates.rank_hh.value = 8
gates.wait()  # the move is computed off the UI thread; wait until it is shown
print(gates.plan.to_json())
print({k: round(v, 3) if isinstance(v, float) else v for k, v in gates.after.items()})"""),
    md("""## Fusing the embedding into the GRU's input projection

In `text-gru` (a topic classifier over sentences from a synthetic grammar, generated
deterministically), tokens go through `nn.Embedding(vocab, E)` and then the GRU computes
`W_ih e + b_ih`. That product depends only on the token, so it can be tabulated once: a lookup
table `(vocab, 3H)`. The outputs are the same (exact product); the input matmul disappears.

But be honest about size: the table has `vocab * 3H` entries instead of `vocab*E + 3H*E`.
With `3H > E` fusion **grows** the model; it is a speed trade, not a compression."""),
    code("""from workbench.layers.fusion import fusion_sizes

text = wb.load("text-gru")
sizes = fusion_sizes(text.model.embed, text.model.rnn)
print(sizes.to_dict())
fused = wb.apply(text.model, get_recipe("fuse_embedding")(text.model, task=text))
x = text.eval_inputs[:200]
print("max |difference| of logits:", float((fused(x) - text.model(x)).abs().max()))
for name, model in (("original", text.model), ("fused", fused)):
    m = wb.measure(model, text)
    print(f"{name:9s} accuracy {m['metric']:.3f}  params {m['params']:6d}  FLOPs {m['flops']:7d}  "
          f"latency {m['latency_ms']:.3f} ms")"""),
]

nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
path = Path(__file__).with_name("04_conv_and_rnn.ipynb")
nbformat.write(nb, path)
print("wrote", path)
