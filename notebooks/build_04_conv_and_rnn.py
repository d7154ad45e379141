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
CPU latency live. All the logic lives in `workbench`; cells only call it.

**Contents**
1. [Why 4-D kernels need tensor decompositions](#Why-4-D-kernels-need-tensor-decompositions)
2. [Tucker ranks of `conv2`, live](#Tucker-ranks-of-conv2,-live)
3. [Recurrent weights are reused at every step](#Recurrent-weights-are-reused-at-every-step)
4. [Rank sliders for the gates](#Rank-sliders-for-the-gates,-with-each-gate's-spectrum)
5. [Fusing the embedding into the GRU's input projection](#Fusing-the-embedding-into-the-GRU's-input-projection)
6. [What you saw](#What-you-saw)

Latencies are CPU wall times for one sample: the median of many runs after warm-up runs, with the
quartiles `[q1–q3]` as the spread (a shared machine is noisy; one run says little)."""),
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
for one sample, timed when you press "measure latency": median and quartiles of 30 runs after 3
warm-up runs). The line above the table compares the factors' weights with the dense kernel and
gives the break-even rank: above it Tucker stores *more* than the kernel it replaces. The figure
below shows the spectra of the kernel's two channel unfoldings (output channels, input channels):
the dashed line is each slider's rank, with the share of sigma^2 it keeps, and the red dotted line
that mode's break-even rank at the other slider's rank (absent when every rank stays smaller)."""),
    code("""tucker = TuckerExplorer(cnn, "conv2", rank_out=24, rank_in=12, latency_repeats=30)
tucker"""),
    code("""# what the "measure latency" button does, run here so the page shows the numbers:
tucker.measure_latency()
tucker.wait()
lat = tucker.latency_spread()
t_orig, t_tucker = lat["original"]["median_ms"], lat["compressed"]["median_ms"]
flops_ratio = tucker.after["flops"] / tucker.before["flops"]
print(f"FLOPs: {flops_ratio:.0%} of the original; latency {t_tucker:.3f} ms against {t_orig:.3f} ms "
      f"(quartiles {lat['compressed']['q1_ms']:.3f}–{lat['compressed']['q3_ms']:.3f} and "
      f"{lat['original']['q1_ms']:.3f}–{lat['original']['q3_ms']:.3f})")
overlap = lat["compressed"]["q1_ms"] <= lat["original"]["q3_ms"] and lat["original"]["q1_ms"] <= lat["compressed"]["q3_ms"]
if overlap:
    print(f"No clear difference (median ratio {t_tucker / t_orig:.2f}, the quartile ranges overlap): the FLOPs saved "
          "are eaten by the overhead of running three small convs instead of one.")
else:
    print("Tucker is", f"{t_orig / t_tucker:.2f}x faster: the FLOPs saved show." if t_tucker < t_orig else
          f"{t_tucker / t_orig:.2f}x slower: three small convs pay three calls' overhead, which on a model "
          "this small outweighs the FLOPs saved.")"""),
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
spectrum falls fast loses little at low rank. As in the dashboard of notebook 01, a slider at its
**right end** keeps that matrix dense. The red dotted line is the **break-even rank**: per gate,
`r (H + cols)` weights against `H cols` dense, so for `W_hh` (64 x 64) rank 32 stores as much as
the dense matrix and any higher rank stores more (the line above the table says "larger than
dense")."""),
    code("""gates = GateRankExplorer(gru, "rnn", rank_ih=3, rank_hh=16, per_gate=True)
gates"""),
    code("""# what a slider move does, without the widget:
gates.rank_hh.value = 8
gates.wait()  # the move is computed off the UI thread; wait until it is shown
print(gates.plan.to_json())
print({k: round(v, 3) if isinstance(v, float) else v for k, v in gates.after.items()})
print(f"original: accuracy {gates.before['metric']:.3f}, {gates.before['params']} params")
print(gates.size_note.value.replace("<b>", "").replace("</b>", ""))
assert gates.break_even(True)["hh"] == 31, 'the text above says rank 32 stores as much as dense W_hh'"""),
    md("""## Fusing the embedding into the GRU's input projection

In `text-gru` (a topic classifier over sentences from a synthetic grammar, generated
deterministically), tokens go through `nn.Embedding(vocab, E)` and then the GRU computes
`W_ih e + b_ih`. That product depends only on the token, so it can be tabulated once: a lookup
table `(vocab, 3H)`. The outputs are the same (exact product); the input matmul disappears.

But be honest about size: the table has `vocab * 3H` entries instead of `vocab*E + 3H*E`.
With `3H > E` fusion **grows** the model. What it buys is FLOPs; whether those turn into time is a
measurement, below."""),
    code("""import torch
from workbench.layers.fusion import fusion_sizes
from workbench.measure import latency_samples, latency_spread

text = wb.load("text-gru")
sizes = fusion_sizes(text.model.embed, text.model.rnn)
print(sizes.to_dict())
assert sizes.grows and sizes.after > 2 * sizes.before, "the text below says the table is more than twice as large"
fused = wb.apply(text.model, get_recipe("fuse_embedding")(text.model, task=text))
x = text.eval_inputs[:200]
with torch.no_grad():
    print("max |difference| of logits:", float((fused(x) - text.model(x)).abs().max()))
fusion = {}
for name, model in (("original", text.model), ("fused", fused)):
    m = wb.measure(model, text, latency=False)
    m["latency"] = latency_spread(latency_samples(model, text.example_input, repeats=50, warmup=5))
    fusion[name] = m
    lat = m["latency"]
    print(f"{name:9s} accuracy {m['metric']:.3f}  params {m['params']:6d}  FLOPs {m['flops']:7d}  "
          f"latency {lat['median_ms']:.3f} ms [{lat['q1_ms']:.3f}–{lat['q3_ms']:.3f}]")
speed = fusion["original"]["latency"]["median_ms"] / fusion["fused"]["latency"]["median_ms"]
print(f"fused: {fusion['fused']['params'] / fusion['original']['params']:.2f}x the parameters, "
      f"{fusion['fused']['flops'] / fusion['original']['flops']:.2f}x the FLOPs, "
      + (f"{speed:.2f}x faster." if speed > 1 else f"{1 / speed:.2f}x slower."))"""),
    md("""The lookup saves the input matmul (the FLOPs column), but on a CPU at batch 1 the time goes to
per-call overhead, not to a 16-wide matmul, and the fused model reads a table more than twice as
large. Whether fusion is a speed trade is the ratio printed above, on *this* machine: a
compression it is not. It pays off when the input projection is a real cost (a large `E`, long
batched sequences), not on a model this small."""),
    md("""## What you saw

The numbers below are those computed above, in this run."""),
    code("""print(f"* Tucker-2 of conv2 at ranks (24, 12): {tucker.after['params'] / tucker.before['params']:.0%} of the "
      f"model's parameters, accuracy {tucker.after['metric']:.3f} (original {tucker.before['metric']:.3f}), "
      f"{flops_ratio:.0%} of the FLOPs, and {t_tucker / t_orig:.2f}x the original's latency at batch 1.")
print(f"* The GRU at rank_ih 3, rank_hh 8 (per gate): {gates.after['params']} of {gates.before['params']} params, "
      f"accuracy {gates.after['metric']:.3f} against {gates.before['metric']:.3f}; W_hh's break-even rank "
      f"is {gates.break_even(True)['hh']} per gate.")
print(f"* Fusing the embedding: outputs equal, {fusion['fused']['params']} params instead of "
      f"{fusion['original']['params']} (it grows), FLOPs x{fusion['fused']['flops'] / fusion['original']['flops']:.2f}, "
      f"latency x{1 / speed:.2f}.")
print("* FLOPs and parameters are exact counts; latency is a noisy measurement, so it is shown with its spread.")"""),
]

nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
path = Path(__file__).with_name("04_conv_and_rnn.ipynb")
nbformat.write(nb, path)
print("wrote", path)
