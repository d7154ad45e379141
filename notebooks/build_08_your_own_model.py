"""Builds notebooks/08_your_own_model.ipynb (outputs cleared). Run: .venv/bin/python notebooks/build_08_your_own_model.py"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

md, code = new_markdown_cell, new_code_cell

cells = [
    md("""# 08 · Your own model

The other lessons use the workbench's embedded models. Here we bring two of our own and take each
through the same steps:

1. [A residual CNN on the digits](#1.-A-residual-CNN-on-the-digits): a hand-written network with
   BatchNorm, trained here in a few seconds.
   - [Loading it: your data, your metric](#Loading-it:-your-data,-your-metric)
   - [What is compressible, what is skipped](#What-is-compressible,-what-is-skipped)
   - [Spectra](#Spectra)
   - [The dashboard](#The-dashboard)
   - [A budgeted allocation](#A-budgeted-allocation)
   - [Recovery](#Recovery)
   - [Export](#Export)
2. [A small GPT-2 built from a config](#2.-A-small-GPT-2-built-from-a-config): a `transformers`
   model with random weights, perplexity as the metric.
   - [Tied weights, counted once](#Tied-weights,-counted-once)
   - [Dashboard, compression, recovery, export](#Dashboard,-compression,-recovery,-export)
3. [What you saw](#What-you-saw): the numbers of this run, side by side

Everything goes through `import workbench as wb`; the [Your own model](../docs/own-model.md) page
lists every option."""),
    md("""## 1. A residual CNN on the digits

scikit-learn's 8x8 digits as 1-channel images, a stem convolution, two residual blocks (conv,
BatchNorm, ReLU, conv, BatchNorm, plus the skip connection), global average pooling and a linear
classifier. Three epochs of Adam with a fixed seed train it (the cell prints how long that took);
this is your code, not the workbench's."""),
    code("""%matplotlib inline
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import workbench as wb

torch.set_num_threads(1)  # networks this small run faster on one CPU thread
digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
labels = torch.tensor(digits.target)
order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
train, test = order[:1400], order[1400:]


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, c=16, blocks=2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


torch.manual_seed(0)
net = ResNet()
optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
start = time.perf_counter()
for epoch in range(3):
    for batch in train[torch.randperm(len(train))].split(32):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(images[batch]), labels[batch]).backward()
        optimizer.step()
net.eval()
print(f"trained: 3 epochs on {len(train)} images in {time.perf_counter() - start:.1f} s")"""),
    md("""### Loading it: your data, your metric

`wb.load` takes the module itself. `eval_data` is what every readout is measured on (here the
397 held-out images), `train_data` what fine-tuning and the allocator's sensitivity analysis
train or choose on (the workbench takes its validation data from it, never from the test
images), and `metric(outputs, targets) -> float` is yours, higher is better. Tensors, `(x, y)`
pairs and DataLoaders are all accepted. Your module is never modified, and it stays in the mode
you left it in."""),
    code("""def accuracy(outputs, targets):
    return float((outputs.argmax(1) == targets).float().mean())


task = wb.load(net, eval_data=(images[test], labels[test]), train_data=(images[train], labels[train]),
               metric=accuracy)
original_accuracy = task.evaluate()
print(f"{task.metric_name} {original_accuracy:.3f} on {len(task.eval_targets)} test images")
assert len(task.eval_targets) == 397  # the text above says so"""),
    md("""### What is compressible, what is skipped

Convolutions and Linear layers are matrices (a conv kernel `(out, in, 3, 3)` is seen as an
`out x (in*9)` matrix) and can be factored, pruned or quantized. Everything else that holds
weights is left alone and listed in `task.extras["skipped"]` with the reason: here the BatchNorm
layers. `workbench.inventory.inventory(model)` lists every module, compressible or not, with its
kind, matrix shape and size."""),
    code("""import pandas as pd
from workbench.inventory import inventory

skipped = pd.DataFrame(task.extras["skipped"])
print(skipped.to_string(index=False))
assert set(skipped["type"]) == {"BatchNorm2d"}  # the text above: only the BatchNorm layers are skipped
shapes = {e.name: e.shape for e in inventory(net) if e.kind != "norm"}
assert shapes["stem.0"] == (16, 9) and shapes["head"] == (10, 16) and shapes["blocks.0.conv1"] == (16, 144)
pd.DataFrame([{"name": e.name, "type": e.type, "kind": e.kind, "shape": e.shape, "params": e.params}
              for e in inventory(net)])"""),
    md("""### Spectra

As in the quickstart: the singular values of each compressible layer, relative to the largest
(top), and the energy kept by the first $r$ of them (bottom). A spectrum that falls fast is a
layer a small rank describes well. The stem (16 x 9) and the head (10 x 16) are tiny; the
block convolutions (16 x 144) are where the weights are."""),
    code("""from workbench.plotting.spectra import spectra_figure, spectra_table

spectra_figure(spectra_table(wb.model_spectra(task.model))).figure"""),
    md("""### The dashboard

The same dashboard as for the embedded models: one rank slider per compressible layer, the
accuracy, size and FLOPs of the compressed copy following each move. The next cell moves one
slider headless, as a user would, and prints the accuracy the display then shows beside the
original's; try other ranks yourself and watch where accuracy starts to fall."""),
    code("""dashboard = wb.Dashboard(task)
dashboard"""),
    code("""rank4_accuracy = dashboard.set_rank("blocks.1.conv2", 4)["result"]["metric"]
print(f"blocks.1.conv2 at rank 4 of 16: accuracy {rank4_accuracy:.3f} (original {original_accuracy:.3f}, "
      f"{rank4_accuracy - original_accuracy:+.3f})")"""),
    md("""### A budgeted allocation

`wb.allocate(task, budget, by, allocator)` splits a budget between the layers: here keep 30% of
the weights (`by="params"`), chosen by the greedy allocator from a sensitivity analysis measured
on a validation split of `train_data`. It returns an `Allocation`: the `plan`, the rank chosen
for each layer (`ranks`, None where a layer stays dense), the fraction of the budget used
(`fraction_used`) and the accuracy of the result on the test images (`metric`).
`wb.apply(task.model, allocation.plan)` builds the compressed copy. The cell prints how far
accuracy falls at this budget; the next section tries to recover it."""),
    code("""allocation = wb.allocate(task, budget=0.3, by="params", allocator="greedy", progress=False)
small = wb.apply(task.model, allocation.plan)
print("ranks:", allocation.ranks)
print(f"weights kept {allocation.fraction_used:.1%}, accuracy {allocation.metric:.3f} "
      f"({allocation.metric - original_accuracy:+.3f} against the original {original_accuracy:.3f})")
pd.DataFrame({"original": wb.measure(task.model, task, latency=False),
              "allocated": wb.measure(small, task, latency=False)}).T"""),
    md("""### Recovery

`wb.finetune(small, task, epochs=...)` trains what the compression left trainable (for a low-rank
layer: its two factors) on `train_data`, stops early on its
validation split and keeps the best epoch. `small` itself is not changed; the recovered model is
`recovery.model`. The cell prints the test accuracy before and after, and how much of the loss
fine-tuning won back."""),
    code("""recovery = wb.finetune(small, task, epochs=15, lr=3e-3, progress=False)
allocated_accuracy, finetuned_accuracy = task.evaluate(small), task.evaluate(recovery.model)
lost, won = original_accuracy - allocated_accuracy, finetuned_accuracy - allocated_accuracy
print(f"best epoch {recovery.best_epoch} of {len(recovery.history)}")
print(f"test accuracy: allocated {allocated_accuracy:.3f} -> fine-tuned {finetuned_accuracy:.3f} "
      f"(original {original_accuracy:.3f}): {won / lost:.0%} of the {lost:.3f} lost won back" if lost > 0 else
      f"test accuracy: allocated {allocated_accuracy:.3f} -> fine-tuned {finetuned_accuracy:.3f}: nothing was lost")"""),
    md("""### Export

`wb.save_compressed` writes the compressed weights and the plan to one `.safetensors` file. The
workbench cannot rebuild a model you brought from its name, so `original=` records a fingerprint
(layer names and shapes), and `wb.load_compressed(..., original=net)` rebuilds the compressed
model on your network (another model is refused). `example_input` lets data-aware layers be
rebuilt without your data. The cell compares the file with the original's weights saved by
`torch.save`, and checks that the reloaded model scores exactly what the fine-tuned one did."""),
    code("""import os
import tempfile

folder = tempfile.mkdtemp()
path = wb.save_compressed(os.path.join(folder, "resnet-small.safetensors"), recovery.model, allocation.plan,
                          "digits-resnet", original=net, example_input=images[:1])
torch.save(net.state_dict(), os.path.join(folder, "resnet.pt"))
loaded = wb.load_compressed(path, original=net)
cnn_file, cnn_original_file = path.stat().st_size, os.path.getsize(os.path.join(folder, "resnet.pt"))
print(f"file {cnn_file:,} bytes, original weights {cnn_original_file:,} bytes ({cnn_file / cnn_original_file:.0%})")
reloaded_accuracy = task.evaluate(loaded.model)
print(f"reloaded accuracy {reloaded_accuracy:.3f} (fine-tuned: {finetuned_accuracy:.3f})")
assert reloaded_accuracy == finetuned_accuracy  # the round trip is exact"""),
    md("""## 2. A small GPT-2 built from a config

A 2-block GPT-2 with a 128-token vocabulary, built from a `GPT2Config`: nothing is downloaded,
and **its weights are random**, so the numbers below only show the mechanics, not what
compression does to a trained language model. The data are random token ids.

Given token ids, a causal LM gets the **perplexity** of the next token as its default metric
(the exponential of the cross-entropy): **lower is better** (`task.higher_is_better` is False),
and the dashboard, the allocator and fine-tuning follow that direction. For a random model
a model guessing uniformly scores the vocabulary size, 128; the cell prints how close this one is. GPT-2's layers are
`transformers`' `Conv1D` (a transposed Linear); the workbench compresses them like any Linear."""),
    code("""from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # the tiny vocabulary does not hold GPT-2's special token ids; we use none
torch.manual_seed(0)
gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=32)).eval()
ids = torch.randint(0, 128, (64, 32))  # 64 random sequences of 32 tokens
lm = wb.load(gpt, eval_data=ids[:32], train_data=ids[32:])
lm_perplexity = lm.evaluate()
print(f"{lm.metric_name}: {lm_perplexity:.1f} ({lm_perplexity / 128:.2f}x the vocabulary size), "
      f"higher is better: {lm.higher_is_better}")
assert 0.8 < lm_perplexity / 128 < 1.25 and not lm.higher_is_better  # near-uniform guessing, as the text says"""),
    md("""### Tied weights, counted once

GPT-2's LM head shares its weight with the token embedding (`lm_head.weight is
transformer.wte.weight`). Both are skipped, with that reason: compressing one would store the
weight twice. `wb.measure` counts the shared tensor once, as `model.parameters()` does; summing
the state dict counts it twice (the difference is the 128 x 64 embedding)."""),
    code("""print(pd.DataFrame(lm.extras["skipped"]).to_string(index=False))
print("tied:", gpt.lm_head.weight is gpt.transformer.wte.weight)
print("wb.measure params:", wb.measure(gpt, lm, latency=False)["params"])
print("sum over parameters():", sum(p.numel() for p in gpt.parameters()))
print("sum over state_dict:", sum(t.numel() for t in gpt.state_dict().values()))
twice = sum(t.numel() for t in gpt.state_dict().values()) - wb.measure(gpt, lm, latency=False)["params"]
print(f"counted twice by the state dict: {twice:,} = 128 x 64")
assert twice == 128 * 64"""),
    md("""### Dashboard, compression, recovery, export

The dashboard gives one slider per `Conv1D` layer (the LM head and the embeddings are not
among them) and its perplexity readout is lower-is-better. The next cell moves the first slider
to rank 4 and prints the perplexity before and after; on random weights the change is small,
and it can go either way (there is no learned structure to lose)."""),
    code("""lm_dashboard = wb.Dashboard(lm)
lm_dashboard"""),
    code("""first = next(iter(lm_dashboard.sliders))
lm_rank4 = lm_dashboard.set_rank(first, 4)["result"]["metric"]
print(f"{first} at rank 4: perplexity {lm_perplexity:.2f} -> {lm_rank4:.2f} "
      f"({'up' if lm_rank4 > lm_perplexity else 'down'} {abs(lm_rank4 - lm_perplexity) / lm_perplexity:.1%})")"""),
    md("""To keep this lesson short, the GPT-2 is compressed by a recipe instead of an allocation: plain
SVD keeping half of each block layer's weights (`wb.allocate(lm, budget=0.5, ...)` takes it the
same way, with its sensitivity analysis on `train_data`). Then one epoch of fine-tuning on the
training ids, and the file. A random model on random tokens has little to recover: look at
`best epoch` (0 means no epoch beat the starting point, and the starting weights were kept; the
cell says which happened)."""),
    code("""lm_plan = wb.recipe("svd")(lm.model, ratio=0.5)
lm_small = wb.apply(lm.model, lm_plan)
lm_small_perplexity = lm.evaluate(lm_small)
print(f"perplexity: original {lm_perplexity:.1f}, SVD at ratio 0.5 {lm_small_perplexity:.1f}")
pd.DataFrame({"original": wb.measure(gpt, lm, latency=False), "svd 0.5": wb.measure(lm_small, lm, latency=False)}).T"""),
    code("""lm_recovery = wb.finetune(lm_small, lm, epochs=1, progress=False)
lm_finetuned = lm.evaluate(lm_recovery.model)
print(f"best epoch {lm_recovery.best_epoch}, perplexity after fine-tuning {lm_finetuned:.1f}: "
      + ("no epoch beat the start, the starting weights were kept" if lm_recovery.best_epoch == 0
         else f"epoch {lm_recovery.best_epoch} was kept"))
lm_path = wb.save_compressed(os.path.join(folder, "gpt-small.safetensors"), lm_recovery.model, lm_plan,
                             "tiny-gpt2", original=gpt, example_input=ids[:1])
lm_loaded = wb.load_compressed(lm_path, original=gpt)
lm_file, lm_original_bytes = lm_path.stat().st_size, wb.measure(gpt, lm, latency=False)["bytes"]
print(f"file {lm_file:,} bytes, original state dict {lm_original_bytes:,} bytes ({lm_file / lm_original_bytes:.0%})")
print(f"reloaded perplexity {lm.evaluate(lm_loaded.model):.1f}")"""),
    md("""## What you saw

The numbers of this run, collected from the cells above (nothing below is typed in by hand):"""),
    code("""print(f"Residual CNN ({len(task.eval_targets)} test images, accuracy, higher is better):")
print(f"  original {original_accuracy:.3f}; one layer at rank 4 {rank4_accuracy:.3f}")
print(f"  greedy allocation keeping {allocation.fraction_used:.1%} of the weights {allocated_accuracy:.3f}, "
      f"fine-tuned {finetuned_accuracy:.3f} (best epoch {recovery.best_epoch})")
print(f"  file {cnn_file:,} bytes, {cnn_file / cnn_original_file:.0%} of the original's {cnn_original_file:,}; "
      f"reloaded exactly ({reloaded_accuracy:.3f})")
print(f"Random GPT-2 ({lm.metric_name}, lower is better):")
print(f"  original {lm_perplexity:.1f} ({lm_perplexity / 128:.2f}x the 128-token vocabulary: near-uniform guessing)")
print(f"  SVD at ratio 0.5 {lm_small_perplexity:.1f}, fine-tuned {lm_finetuned:.1f} (best epoch {lm_recovery.best_epoch})")
print(f"  file {lm_file:,} bytes, {lm_file / lm_original_bytes:.0%} of the state dict's {lm_original_bytes:,}; "
      f"the tied embedding ({twice:,} weights) counted once")"""),
    md("""What you did, on two models the workbench had never seen:

- `wb.load(model, eval_data=..., train_data=..., metric=...)` made a task from your module and
  your data; without a metric a causal LM is judged by perplexity (lower is better), any other
  model by output fidelity.
- `task.extras["skipped"]` and `workbench.inventory.inventory` said what can be compressed and
  why the rest is left alone (BatchNorm, embeddings, a tied LM head).
- `wb.model_spectra` and the dashboard showed how much rank each layer needs; `wb.allocate`
  split a budget between the CNN's layers, a recipe compressed the GPT-2; `wb.finetune` trained
  the compressed models on your training data;
  `wb.save_compressed` / `wb.load_compressed` with `original=` wrote and rebuilt the small model.
- Shared (tied) weights are counted once.

What to try next: pruning or quantization instead of SVD (the explorers of lessons 02 and 03),
other allocators (`"uniform"`, `"energy"`, `"convex"`),
`wb.allocate` and `wb.model_spectra` on the GPT-2, the
command line on a saved state dict (`python -m workbench compress net.pt --constructor
MODULE:FN --data data.pt ...`, see [the CLI](../docs/cli.md)), and a trained model of your own,
where the spectra stop being flat."""),
]

notebook = new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
    "language_info": {"name": "python"},
})
path = Path(__file__).with_name("08_your_own_model.ipynb")
nbformat.write(notebook, path)
print(f"wrote {path}")
