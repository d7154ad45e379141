"""Figures for convolutions and recurrent networks. Prints one JSON document.

* ``digits-cnn`` with its convolutions at ~50% of their weights: Tucker-2, CP, spatial SVD and
  structured channel pruning, accuracy before and after a short fine-tune, conv weights kept,
  FLOPs and CPU latency (batch 1 and batch 256) against the original.
* ``digits-gru`` / ``digits-lstm`` at 50% and 25% of their recurrent weights (``weight_ih`` +
  ``weight_hh``), per gate and stacked, same measures. The original runs PyTorch's fused RNN
  kernel; ``LowRankRNN`` runs a Python loop, so the table also lists the *dense* matrices run by
  that same loop (``python loop, dense``) as the like-for-like latency reference.

Run: ``python benchmarks/conv_rnn.py [--epochs 3]`` (a few minutes on 2 cores; timings are noisy
on a shared machine).
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
from torch import nn
from tqdm.auto import tqdm

import workbench as wb
from workbench.layers.recurrent import LowRankRNN
from workbench.measure import count_flops, count_params, latency_ms
from workbench.registry import get_recipe, recipes

CONV_NAMES = ("conv1", "conv2")


def finetune(model: nn.Module, task, epochs: int, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with all its trainable parameters trained ``epochs`` epochs (Adam, CE)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    x, y = task.train_inputs, task.train_targets
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def row(label: str, model: nn.Module, task, epochs: int, part: callable, base: dict | None) -> dict:
    batch = task.eval_inputs[:256]
    result = {"label": label, "accuracy": round(task.evaluate(model), 4),
              "params": count_params(model), "part_params": part(model),
              "flops": count_flops(model, task.example_input),
              "latency_ms_b1": round(latency_ms(model, task.example_input, repeats=100), 4),
              "latency_ms_b256": round(latency_ms(model, batch, repeats=20), 4)}
    if epochs and base is not None:
        result["accuracy_finetuned"] = round(task.evaluate(finetune(model, task, epochs)), 4)
    if base is not None:
        result["part_kept"] = round(result["part_params"] / base["part_params"], 3)
        result["latency_vs_original_b1"] = round(result["latency_ms_b1"] / base["latency_ms_b1"], 2)
        result["latency_vs_original_b256"] = round(result["latency_ms_b256"] / base["latency_ms_b256"], 2)
    return result


def conv_params(model: nn.Module) -> int:
    """Kernel weights of every Conv2d inside the original conv layers' places (biases excluded)."""
    return sum(m.weight.numel() for n in CONV_NAMES for m in model.get_submodule(n).modules()
               if isinstance(m, nn.Conv2d))


def rnn_params(model: nn.Module) -> int:
    """Weight-matrix entries of the recurrent layer (biases excluded)."""
    rnn = model.rnn
    if isinstance(rnn, LowRankRNN):
        return sum(p.numel() for n, p in rnn.named_parameters() if not n.startswith("bias"))
    return rnn.weight_ih_l0.numel() + rnn.weight_hh_l0.numel()


def conv_figures(epochs: int) -> list[dict]:
    task = wb.load("digits-cnn")
    base = row("original", task.model, task, 0, conv_params, None)
    rows = [base]
    plans = {f"{m} (ratio 0.5 per conv)": get_recipe(m)(task.model, ratio=0.5) for m in ("tucker", "cp", "spatial-svd")}
    if "prune" in recipes():
        plans["structured channel pruning (71% of channels kept)"] = get_recipe("prune")(
            task.model, task=task, ratio=0.71, structured=True, layers=list(CONV_NAMES))
    for label, plan in tqdm(plans.items(), desc="digits-cnn", leave=False):
        model = wb.apply(task.model, plan)
        r = row(label, model, task, epochs, conv_params, base)
        r["plan"] = plan.to_dict()["layers"] or plan.to_dict()["steps"]
        rows.append(r)
    if "prune" not in recipes():
        rows.append({"label": "structured channel pruning", "status": "pending (method 'prune' not registered)"})
    return rows


def rnn_figures(name: str, epochs: int) -> list[dict]:
    task = wb.load(name)
    base = row("original (fused torch kernel)", task.model, task, 0, rnn_params, None)
    loop = wb.apply(task.model, wb.Plan({"rnn": wb.LayerPlan("svd_rnn", {"rank_ih": None, "rank_hh": None})}))
    rows = [base, row("python loop, dense", loop, task, 0, rnn_params, base)]
    for ratio in (0.5, 0.25):
        for per_gate in (True, False):
            plan = get_recipe("svd_rnn")(task.model, ratio=ratio, per_gate=per_gate)
            model = wb.apply(task.model, plan)
            r = row(f"svd_rnn ratio {ratio} {'per gate' if per_gate else 'stacked'}", model, task, epochs,
                    rnn_params, base)
            r["plan"] = dict(plan.layers["rnn"].params)
            rows.append(r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs (0: skip)")
    args = parser.parse_args()
    torch.manual_seed(0)
    out = {"threads": torch.get_num_threads(), "finetune_epochs": args.epochs,
           "digits-cnn": conv_figures(args.epochs)}
    for name in ("digits-gru", "digits-lstm"):
        out[name] = rnn_figures(name, args.epochs)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
