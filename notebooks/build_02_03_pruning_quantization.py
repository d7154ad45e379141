"""Builds notebooks/02_pruning.ipynb and 03_quantization.ipynb (without outputs):
``python notebooks/build_02_03_pruning_quantization.py``."""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

md, code = new_markdown_cell, new_code_cell
HERE = Path(__file__).parent

#: the timing helper both notebooks define (a few lines over `workbench.measure.latency_samples`)
TIMING = '''def timing(model, batch, repeats=100, warmup=10):
    """Median and quartiles (ms) of `repeats` timed runs after `warmup` untimed ones."""
    q1, median, q3 = np.percentile(latency_samples(model, batch, repeats=repeats, warmup=warmup), [25, 50, 75])
    return {"median ms": median, "q1 ms": q1, "q3 ms": q3}


def compare(times, a, b):
    """'a is faster than b' only when their interquartile ranges do not overlap."""
    if times.loc[a, "q3 ms"] < times.loc[b, "q1 ms"]:
        return f"{a} is faster than {b} ({times.loc[a, 'median ms']:.3f} against {times.loc[b, 'median ms']:.3f} ms)"
    if times.loc[b, "q3 ms"] < times.loc[a, "q1 ms"]:
        return f"{a} is slower than {b} ({times.loc[a, 'median ms']:.3f} against {times.loc[b, 'median ms']:.3f} ms)"
    return (f"{a} and {b} are not told apart ({times.loc[a, 'median ms']:.3f} against "
            f"{times.loc[b, 'median ms']:.3f} ms, overlapping quartiles)")'''

TIMING_NOTE = """**How time is measured.** `latency_samples` runs the model 10 times untimed (warm-up: caches,
allocator, lazy initialisation), then times 100 runs; the table gives the median and the quartiles
(q1–q3, the middle half of the runs). One run alone can be off by 10x on a busy machine, so a
difference counts only when the quartile ranges do not overlap; the sentences under the table say
so from the numbers. Times depend on the machine and its load: rerun the cell."""

SIZE_NOTE = """**One notion of size.** Two byte counts appear here, and they measure the same thing two ways:
the tables report **file bytes** (`saved_bytes`: the state dict written with `torch.save`), the
explorer reports the **tensor payload** (numel × element size of every tensor, what the file holds
without its container of names and zip headers), which it can compute at every slider move without
writing a file. The file is the payload plus a few KiB; the first cell prints both."""

pruning = [
    md("""# 02 · Pruning: removing weights, and removing neurons

**Magnitude pruning** bets that small weights matter little: keep the weights with `|w| > t`,
set the rest to zero. Two ways to pick `t`:

- *per layer*: each layer keeps the same fraction `ratio` of its weights;
- *global*: one cut `t` for the whole network, so layers with many small weights lose more.

A zero stored as a float still costs 4 bytes. The workbench stores a pruned layer **sparsely** —
a bitmap (one bit per weight) plus the kept values, or compressed sparse rows when very few
remain — so the file really shrinks. Whether it also runs faster is measured below.
**Structured** pruning removes whole neurons instead, so the next layer gets narrower.

**Contents**
1. [Kept fraction against accuracy and bytes](#Kept-fraction-against-accuracy-and-bytes)
2. [Explore the cut](#Explore-the-cut)
3. [Structured pruning: narrower layers](#Structured-pruning:-narrower-layers)
4. [Does pruning make it faster?](#Does-pruning-make-it-faster?)
5. [Coupled channel groups: a residual network, live](#Coupled-channel-groups:-a-residual-network,-live)
6. [Recovering by training: gradual pruning](#Recovering-by-training:-gradual-pruning)
7. [What you saw](#What-you-saw)

""" + SIZE_NOTE),
    code("""%matplotlib inline
import numpy as np
import pandas as pd
from IPython.display import Markdown

import workbench as wb
from workbench.measure import latency_samples, saved_bytes
from workbench.registry import get_recipe
from workbench.ties import payload_bytes

task = wb.load("digits-mlp")
original = {"accuracy": task.evaluate(), "bytes": saved_bytes(task.model)}
payload = payload_bytes(task.model.state_dict())
print(f"original: accuracy {original['accuracy']:.3f}, file {original['bytes']:,} bytes "
      f"= tensor payload {payload:,} + {original['bytes'] - payload:,} bytes of container")"""),
    md("""## Kept fraction against accuracy and bytes

`get_recipe("prune")` turns options into a `Plan`; `wb.apply` builds a new model (the original is
never touched). *bytes* are file bytes."""),
    code("""rows, pruned_models = [], {}
for ratio in (0.5, 0.2, 0.1, 0.05):
    for scope in ("layer", "global"):
        pruned = pruned_models[ratio, scope] = wb.apply(task.model, get_recipe("prune")(task.model, ratio=ratio, scope=scope))
        rows.append({"kept": ratio, "scope": scope, "accuracy": task.evaluate(pruned), "bytes": saved_bytes(pruned)})
table = pd.DataFrame(rows)
table"""),
    code("""def removed(model):
    \"\"\"{layer: fraction of its weights that are zero}\"\"\"
    return {n: float((model.get_submodule(n).dense_weight() == 0).float().mean()) for n in ("fc1", "fc2", "fc3")}

by_scope = table.pivot(index="kept", columns="scope", values="accuracy").sort_index(ascending=False)
for kept, row in by_scope.iterrows():
    gap = row["global"] - row["layer"]
    verdict = "a tie" if abs(gap) < 0.005 else f"{'global' if gap > 0 else 'per layer'} wins by {abs(gap):.3f}"
    print(f"kept {kept:.0%}: per layer {row['layer']:.3f}, global {row['global']:.3f} -> {verdict}")
share = removed(pruned_models[0.2, "global"])
mean_abs = {n: float(task.model.get_submodule(n).weight.detach().abs().mean()) for n in share}
print("mean |w|: " + ", ".join(f"{n} {m:.4f}" for n, m in mean_abs.items())
      + f"; the smallest weights are in {min(mean_abs, key=mean_abs.get)}")
print("global cut at 20% kept removes " + ", ".join(f"{n} {s:.0%}" for n, s in share.items())
      + f": most from {max(share, key=share.get)}, least from {min(share, key=share.get)}")"""),
    md("""Where global wins, the cell shows how: one cut takes most from the layer with the smallest
weights, so the other layers — among them the 10-output classifier — lose less than the 80% that
per-layer pruning takes from every layer alike.

## Explore the cut

Move the threshold: the red lines mark `±t` on the weight histogram (everything between them is
pruned), the heatmap shows the fraction removed in each layer, and accuracy and payload bytes
follow. The slider starts at `t = 0` (the original, dense, at its **left** end: pruning more moves
right) and stops before the first cut that would empty a layer; a plan asking for such a cut is
refused with a message."""),
    code("""from workbench.widgets.pruning import PruningExplorer

explorer = PruningExplorer(task, threshold=0.05)
explorer"""),
    code("""explorer.threshold.value = 0.1  # move the slider, as a user would
state = explorer.wait()
print(f"t = 0.1: accuracy {state['metric']:.3f}, payload {state['bytes']:,} bytes; removed "
      + ", ".join(f"{n} {s:.0%}" for n, s in state["sparsity"].items()))
explorer.update(1.0)  # a cut beyond the slider: refused with a message, nothing changes
print("t = 1.0 refused:", explorer.error.value.split("</span>")[0].split("&#9888; ")[-1])
assert explorer.state is state
explorer.request()  # show what the slider shows again (clears the message)
explorer.wait()
explorer.view.figure  # a still copy of the explorer's figure at t = 0.1, for readers without a kernel"""),
    md("""## Structured pruning: narrower layers

Removing half the neurons of `fc1` and `fc2` (smallest L1 norm) — Torch-Pruning's dependency
graph also drops the matching input columns of the next layer."""),
    code("""structured = wb.apply(task.model, get_recipe("prune")(task.model, task=task, ratio=0.5, structured=True))
print(structured)
structured_accuracy, structured_bytes = task.evaluate(structured), saved_bytes(structured)
print(f"accuracy {structured_accuracy:.3f}, {structured_bytes:,} bytes "
      f"({structured_bytes / original['bytes']:.0%} of the original file)")"""),
    md("""## Does pruning make it faster?

A bitmap-stored layer rebuilds its dense weight at every call, a CSR-stored one (very few weights
left) runs a sparse product; a structurally pruned model is just a smaller dense one. Timed on a batch of 256
images:

""" + TIMING_NOTE),
    code(TIMING + """


batch = task.eval_inputs[:256]
candidates = {"original": task.model, "50% pruned": pruned_models[0.5, "global"],
              "95% pruned": pruned_models[0.05, "global"], "structured 50%": structured}
for name in ("50% pruned", "95% pruned"):
    print(f"{name} stored as", {n: candidates[name].get_submodule(n).format for n in ("fc1", "fc2", "fc3")})
times = pd.DataFrame({name: timing(model, batch) for name, model in candidates.items()}).T
print(times.round(3))
for name in ("50% pruned", "95% pruned", "structured 50%"):
    print(compare(times, name, "original"))"""),
    md("""## Coupled channel groups: a residual network, live

In an MLP each hidden layer's width is its own. In a residual network it is not: `y = x + f(x)`
adds two tensors channel by channel, so the layers writing `x` and `f(x)` must keep **the same
channels**, and every layer reading `y` loses the matching input channels. Pruning one of them
alone would break the sum; pruning each layer by its own ranking and removing the union (what a
per-layer pass does) keeps far fewer channels than asked. `digits-resnet` (a small residual CNN
with BatchNorm) has such **coupled groups**: Torch-Pruning's dependency graph finds them, each
group gets one importance per channel (the L1 norms of all its members, summed), and its channels
are removed together from every member.

`wb.StructuredExplorer` gives one slider per group: the number of channels kept. It builds the
really smaller model (a new one; the task's model is untouched) and times it against the original
at batch 1 and at the batch size chosen in the dropdown — interleaved in the same run, at fixed
threads, median and quartiles after warm-up — next to the **FLOP ratio** (pruned / original
FLOPs). The table lists the groups and the layers each one sets."""),
    code("""from IPython.display import display
from workbench.methods.group_pruning import group_rows

resnet = wb.load("digits-resnet")
resnet_accuracy = resnet.evaluate()
groups = wb.StructuredExplorer(resnet, repeats=20, batch=64)
print(f"digits-resnet: accuracy {resnet_accuracy:.3f}, {len(groups.knobs)} coupled groups")
with pd.option_context("display.max_colwidth", None):
    display(pd.DataFrame([{"group (root layer)": k.name, "channels": k.channels, "layers it sets": ", ".join(k.members)}
                          for k in groups.knobs]).set_index("group (root layer)"))
groups"""),
    md("""Below, every slider is set to half its group (as a user would move them). The counts are read
back from the built model (each group's root layer's output width): the kept fraction is exact,
group by group. Then the same model is fine-tuned for 3 epochs (`wb.finetune`, on a copy), and the
measured speed-up is set against the speed-up the FLOP ratio would promise."""),
    code("""half = {knob.name: knob.channels // 2 for knob in groups.knobs}
groups.set_settings(half)
state = groups.wait()
kept = pd.DataFrame(group_rows(resnet.model, state["model"], state["plan"])).set_index("root")
kept["kept fraction"] = kept["channels_after"] / kept["channels_before"]
print(kept[["channels_before", "channels_after", "kept fraction"]].to_string())
exact = bool((kept["kept fraction"] == 0.5).all())
print(f"every group keeps exactly half of its channels: {exact}")
assert exact  # the claim above, measured

pruned_accuracy = resnet.evaluate(state["model"])
tuned_accuracy = resnet.evaluate(wb.finetune(state["model"], resnet, epochs=3, progress=False).model)
print(f"accuracy: original {resnet_accuracy:.3f}, half of every group {pruned_accuracy:.3f}, "
      f"after 3 epochs of fine-tuning {tuned_accuracy:.3f}")


def speed_verdict(s):
    \"\"\"Faster / slower only when the speed-up's quartile range lies above / below 1x.\"\"\"
    if s["low"] > 1:
        return "faster than the original"
    if s["high"] < 1:
        return "slower than the original"
    return "not told apart from the original (its quartile range spans 1x)"


flop_gain = 1 / state["flop_ratio"]
for size, s in state["speedup"].items():
    promise = ("within the measured range" if s["low"] <= flop_gain <= s["high"] else
               "the measured speed-up falls short of it" if flop_gain > s["high"] else
               "the measured speed-up goes beyond it")
    print(f"batch {size}: speed-up {s['median']:.2f}x [quartiles {s['low']:.2f}–{s['high']:.2f}], "
          f"{speed_verdict(s)}; the FLOP ratio {state['flop_ratio']:.2f} would promise {flop_gain:.1f}x: {promise}")
one, many = state["speedup"][1], state["speedup"][state["batch"]]
print(f"batch 1 against batch {state['batch']}: "
      + (f"the larger batch gains more ({many['median']:.2f}x against {one['median']:.2f}x; quartiles apart)"
         if many["low"] > one["high"] else
         f"the larger batch gains less ({many['median']:.2f}x against {one['median']:.2f}x; quartiles apart)"
         if many["high"] < one["low"] else
         f"not told apart ({one['median']:.2f}x and {many['median']:.2f}x, overlapping quartiles)"))
groups.view.figure  # a still copy of the explorer's figure at half of every group, for readers without a kernel"""),
    md("""Why the measured speed-up and the FLOP ratio can disagree: FLOPs count multiply-adds only. A
call also pays fixed costs that pruning does not shrink — Python and operator dispatch for every
layer, memory allocation, the BatchNorm, activation and pooling passes — and on a model this small
they are a large share of the time. Per image they weigh most at batch 1, where nothing shares
them, so a larger batch can come closer to the FLOP promise; the last line above says whether this
run saw that. Move the sliders and the batch-size dropdown to see where the removed channels pay.

## Recovering by training: gradual pruning

Pruning all at once hurts; pruning a little, fine-tuning the survivors (pruned weights stay at
exactly zero), and repeating can recover much of it — the cell measures how much. The schedule is
AGP's cubic ramp `s_t = s_f (1 - (1 - t/n)^3)`: large steps first, small steps near the target."""),
    code("""from workbench.recovery import iterative_pruning

one_shot = wb.apply(task.model, get_recipe("prune")(task.model, ratio=0.05))
run = iterative_pruning(task, ratio=0.05, steps=4, epochs_per_step=2)
one_shot_accuracy, gradual_accuracy = task.evaluate(one_shot), task.evaluate(run.pruned)
recovered = (gradual_accuracy - one_shot_accuracy) / (original["accuracy"] - one_shot_accuracy)
print(f"95% pruned: one shot {one_shot_accuracy:.3f}, gradual {gradual_accuracy:.3f} "
      f"(original {original['accuracy']:.3f}): gradual pruning recovers {recovered:.0%} of what one shot lost")
pd.DataFrame(run.history)"""),
    md("## What you saw"),
    code("""wins = [f"{kept:.0%}" for kept, row in by_scope.iterrows() if row["global"] - row["layer"] >= 0.005]
speed = "; ".join(compare(times, name, "original") for name in ("50% pruned", "95% pruned", "structured 50%"))
Markdown(f\"\"\"- **Global against per-layer cuts:** global scored higher at {', '.join(wins) or 'no'} kept
  fraction{'s' if len(wins) != 1 else ''} tried; its cut took most from {max(share, key=share.get)}.
- **Bytes:** keeping 5% of the weights (global) left a file of {table.query("kept == 0.05 and scope == 'global'")['bytes'].item():,}
  bytes, {table.query("kept == 0.05 and scope == 'global'")['bytes'].item() / original['bytes']:.0%} of the original.
- **Structured 50%:** accuracy {structured_accuracy:.3f} at {structured_bytes / original['bytes']:.0%} of the bytes.
- **Time (median of 100 runs, batch 256):** {speed}.
- **Coupled groups (digits-resnet):** {len(kept)} groups, each keeping exactly
  {', '.join(f"{a}/{b}" for a, b in zip(kept['channels_after'], kept['channels_before']))} channels; accuracy
  {pruned_accuracy:.3f} at half of every group, {tuned_accuracy:.3f} after 3 epochs of fine-tuning (original
  {resnet_accuracy:.3f}); FLOP ratio {state['flop_ratio']:.2f} (promising {flop_gain:.1f}x); measured at batch
  {state['batch']}: {many['median']:.2f}x, {speed_verdict(many)}.
- **Gradual pruning** to 95% scored {gradual_accuracy:.3f} against {one_shot_accuracy:.3f} in one shot,
  recovering {recovered:.0%} of the loss.\"\"\")"""),
]

quantization = [
    md("""# 03 · Quantization: fewer bits per weight

A float32 weight costs 32 bits. **Uniform quantization** to `b` bits snaps each weight to a grid
of evenly spaced values, `w ≈ scale · (code − zero_point)`, rounding to the nearest one, so
each weight moves by at most `scale / 2`. *Symmetric* grids are centred on zero; *asymmetric*
ones cover `[min, max]`; a *per-channel* grid gives each output neuron its own scale.

**K-means** (weight clustering) lets the data choose the `2^b` values: a codebook of centroids,
dense where the weights are dense. Both store `b`-bit **codes packed** into bytes, so a 4-bit
layer really takes 4 bits a weight plus a few scales.

**Contents**
1. [Bits against accuracy and bytes](#Bits-against-accuracy-and-bytes)
2. [Why 1 bit beats 2 bits on the max range](#Why-1-bit-beats-2-bits-on-the-max-range)
3. [Explore the grid](#Explore-the-grid)
4. [int8: integer kernels, timed](#int8:-integer-kernels,-timed)
5. [What you saw](#What-you-saw)

""" + SIZE_NOTE),
    code("""%matplotlib inline
import numpy as np
import pandas as pd
from IPython.display import Markdown

import workbench as wb
from workbench.measure import latency_samples, saved_bytes
from workbench.registry import get_recipe
from workbench.ties import payload_bytes

task = wb.load("digits-mlp")
fp32_bytes = saved_bytes(task.model)
fp32_accuracy = task.evaluate()
payload = payload_bytes(task.model.state_dict())
print(f"original: accuracy {fp32_accuracy:.3f}, file {fp32_bytes:,} bytes "
      f"= tensor payload {payload:,} + {fp32_bytes - payload:,} bytes of container")"""),
    md("""## Bits against accuracy and bytes

Symmetric grids, per tensor unless *per channel*; *bytes / fp32* compares file bytes. A uniform
grid's range is set by `clip`: `"max"` takes it from the largest weight, `"mse"` (the default up
to 4 bits) tries fractions of that range and keeps the one with the least squared rounding error.
The table shows both at 4 and 2 bits; 1 bit (binarization, `±mean|w|`) is the same under every clip."""),
    code("""from workbench.kernels.quant import default_clip

settings = [(8, "uniform", False, None), (4, "uniform", False, "max"), (4, "uniform", False, "mse"),
            (4, "uniform", True, None), (4, "kmeans", False, None), (2, "uniform", False, "max"),
            (2, "uniform", False, "mse"), (2, "uniform", True, None), (2, "kmeans", False, None),
            (1, "uniform", False, None), (1, "kmeans", False, None)]
rows, models = [], {}
for bits, scheme, per_channel, clip in settings:
    plan = get_recipe("quant")(task.model, bits=bits, scheme=scheme, per_channel=per_channel, clip=clip)
    model = models[bits, scheme, per_channel, clip] = wb.apply(task.model, plan)
    shown_clip = "—" if scheme == "kmeans" or bits == 1 else (clip or default_clip(bits))
    rows.append({"bits": bits, "scheme": scheme, "per channel": per_channel, "clip": shown_clip,
                 "accuracy": task.evaluate(model), "bytes / fp32": saved_bytes(model) / fp32_bytes})
table = pd.DataFrame(rows)
table"""),
    code("""def row(bits, scheme, per_channel=False, clip=None):
    return table.iloc[settings.index((bits, scheme, per_channel, clip))]

for bits in (4, 2):
    candidates = {"uniform, max range": row(bits, "uniform", clip="max"), "uniform, mse range": row(bits, "uniform", clip="mse"),
                  "uniform per channel": row(bits, "uniform", True), "k-means": row(bits, "kmeans")}
    best = max(candidates, key=lambda name: candidates[name]["accuracy"])
    print(f"{bits} bits: " + ", ".join(f"{name} {r['accuracy']:.3f}" for name, r in candidates.items())
          + f" (original {fp32_accuracy:.3f}) at about 1/{1 / candidates['k-means']['bytes / fp32']:.0f} of the bytes; "
          f"best: {best}")
one, two_max, two_mse = row(1, "uniform"), row(2, "uniform", clip="max"), row(2, "uniform", clip="mse")
for label, two in (("max range", two_max), ("mse range", two_mse)):
    print(f"1 bit {one['accuracy']:.3f} against 2 bits with the {label} {two['accuracy']:.3f} -> "
          f"{'1 bit wins' if one['accuracy'] > two['accuracy'] else '2 bits win'}")"""),
    md("""## Why 1 bit beats 2 bits on the max range

More bits should not lose, yet on the max range they can. The two grids are built differently
(`workbench.kernels.quant`):

- **2 bits, symmetric, max range:** codes `{-1, 0, +1}` times `scale = max|w|`. The step is set by
  the single largest weight, so every weight with `|w| < max|w| / 2` — almost all of them in a
  bell-shaped layer — rounds to **0**. Three levels exist, but nearly all weights sit on one of
  them: the layer is mostly erased.
- **1 bit:** `w ≈ ±mean|w|`: every weight keeps its **sign** and gets a typical magnitude. Crude,
  but no weight is erased.

The cell below computes, per layer, the share of weights that each 2-bit grid sends to zero and
the weight errors. The mse range gives up the few largest weights (they get the end level) for a
step that fits the bulk; per-channel grids (one range per neuron) and k-means (levels placed by
the data) also suffer less."""),
    code("""stats = []
for name in ("fc1", "fc2", "fc3"):
    w = task.model.get_submodule(name).weight.detach()
    top, mean_abs = float(w.abs().max()), float(w.abs().mean())
    w_hat = {key: models[key].get_submodule(name).dequantized_weight()
             for key in ((2, "uniform", False, "max"), (2, "uniform", False, "mse"), (1, "uniform", False, None))}
    stats.append({"layer": name, "max |w|": top, "mean |w|": mean_abs,
                  "-> 0, 2 bits max": float((w_hat[2, "uniform", False, "max"] == 0).float().mean()),
                  "-> 0, 2 bits mse": float((w_hat[2, "uniform", False, "mse"] == 0).float().mean()),
                  "MSE 2 bits max": float(((w_hat[2, "uniform", False, "max"] - w) ** 2).mean()),
                  "MSE 2 bits mse": float(((w_hat[2, "uniform", False, "mse"] - w) ** 2).mean()),
                  "MSE 1 bit": float(((w_hat[1, "uniform", False, None] - w) ** 2).mean())})
stats = pd.DataFrame(stats).set_index("layer")
print(stats.round(5).to_string())
erased = stats["-> 0, 2 bits max"]
print(f"On the max range the 2-bit step is max|w| ({stats['max |w|'].min():.3f}–{stats['max |w|'].max():.3f}), "
      f"{(stats['max |w|'] / stats['mean |w|']).min():.0f}–{(stats['max |w|'] / stats['mean |w|']).max():.0f}x "
      f"the mean |w|, so {erased.min():.0%}–{erased.max():.0%} of each layer's weights round to 0 "
      f"(mse range: {stats['-> 0, 2 bits mse'].min():.0%}–{stats['-> 0, 2 bits mse'].max():.0%}; 1 bit: none). "
      f"Weight MSE at 1 bit is {'below' if (stats['MSE 1 bit'] < stats['MSE 2 bits max']).all() else 'not always below'} "
      f"the max-range 2-bit MSE in every layer, and "
      f"{'above' if (stats['MSE 1 bit'] > stats['MSE 2 bits mse']).all() else 'not always above'} the mse-range one.")
assert one["accuracy"] > two_max["accuracy"]  # the section title's claim, measured"""),
    md("""## Explore the grid

The red lines are the levels in use (values some weight takes) over the layer's weight histogram:
evenly spaced for uniform (on its default range: `mse` up to 4 bits, `max` above), following the
distribution for k-means. The titles count the levels and say what share of the weights sits on
the busiest one. The slider has 8 bits (closest to the original) at its right end."""),
    code("""from workbench.widgets.quantization import QuantizationExplorer

explorer = QuantizationExplorer(task, bits=3)
explorer"""),
    code("""explorer.bits.value = 2  # move the slider, as a user would
explorer.wait()
explorer.view.figure  # a still copy of the explorer's figure at 2 bits, for readers without a kernel"""),
    md("""## int8: integer kernels, timed

Packed `b`-bit layers dequantize before a float product: they save bytes, not time. `int8`
uses integer kernels (int8 weights per channel, activations quantized on the fly), which *can* be
faster — or not, on a layer this small, where quantizing the activations costs about as much as
the product saves. Whether it is, here, is measured on a batch of 256 images.

""" + TIMING_NOTE),
    code(TIMING + """


int8 = wb.apply(task.model, get_recipe("int8")(task.model))
int8_accuracy, int8_bytes = task.evaluate(int8), saved_bytes(int8)
print(f"int8: accuracy {int8_accuracy:.3f}, {int8_bytes:,} bytes ({int8_bytes / fp32_bytes:.0%} of fp32)")
batch = task.eval_inputs[:256]
times = pd.DataFrame({"int8": timing(int8, batch), "fp32": timing(task.model, batch)}).T
print(times.round(3))
print(compare(times, "int8", "fp32"))"""),
    md("""On a 1536×384 layer at batch 64 the integer kernels have more work to save
(`benchmarks/pruning_quant.py` times them).

## What you saw"""),
    code("""Markdown(f\"\"\"- **4 bits** kept accuracy at {row(4, 'uniform', clip='mse')['accuracy']:.3f} (uniform, mse range),
  {row(4, 'uniform', clip='max')['accuracy']:.3f} (max range) and {row(4, 'kmeans')['accuracy']:.3f} (k-means)
  against {fp32_accuracy:.3f}, at about 1/{1 / row(4, 'kmeans')['bytes / fp32']:.0f} of the bytes.
- **2 bits:** uniform per tensor scored {two_max['accuracy']:.3f} on the max range and {two_mse['accuracy']:.3f}
  on the mse range; per channel {row(2, 'uniform', True)['accuracy']:.3f}, k-means {row(2, 'kmeans')['accuracy']:.3f}.
- **1 bit beat 2 bits on the max range** ({one['accuracy']:.3f} against {two_max['accuracy']:.3f}): that grid's
  step is the largest weight, which sends {erased.min():.0%}–{erased.max():.0%} of the weights to zero; 1 bit
  keeps every sign. With the mse range 2 bits {'win' if two_mse['accuracy'] > one['accuracy'] else 'still lose'}
  ({two_mse['accuracy']:.3f}).
- **int8:** accuracy {int8_accuracy:.3f} at {int8_bytes / fp32_bytes:.0%} of the bytes; {compare(times, 'int8', 'fp32')}.\"\"\")"""),
]

for name, cells in (("02_pruning.ipynb", pruning), ("03_quantization.ipynb", quantization)):
    notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                  "language": "python"}})
    nbformat.write(notebook, HERE / name)
    print("wrote", HERE / name)
