"""Structured pruning that makes models faster (issue 18): measured speed-ups and fidelity.

* ``minilm``: MiniLM dense vs heads + FFN width pruned to ``--ratio`` (0.5) of the encoder's Linear
  parameters (``get_recipe("prune")(model, task=task, ratio=0.5, structured=True,
  global_ranking=True)``: with ``--allocation global``, the default, the units of all blocks are
  ranked together, so blocks keep different sizes; ``uniform``: each block keeps ``ratio`` of its
  own; units ranked on the ``--plan-calibration`` set's sentences). CPU latency of one forward pass on 64 evaluation sentences at
  ``--threads`` (2) threads: median of ``--repeats`` runs after warm-up, the dense and the pruned
  model timed alternately in the same run. Mean cosine to the original embeddings on the
  unseen-topic evaluation sentences (``task.evaluate``): pruned; after the least-squares refit of
  the blocks' output projections (`workbench.recovery.refit_projections`, no training); after
  block-wise reconstruction of the pruned model (`workbench.recovery.blockwise.reconstruct_blocks`,
  12 epochs at lr 1e-3: the best measured), both on ``--calibration`` (``extended``: the 2727 rows
  of ``load("minilm", calibration="extended")``, 80 more topics, which lifts the cosine, see the docs;
  ``default``: the 727 rows of ``load("minilm")``; ``--plan-calibration`` defaults to ``default``),
  plus a copy of the rows with ``--augment`` (0.15) of their tokens replaced by random wordpieces
  (`workbench.zoo.minilm.augment_rows`; 0: none); then, from the block-wise result, end-to-end
  embedding distillation (`workbench.recovery.embedding_distill`:
  loss 1 - cosine of the final embeddings, all weights, ``--distill-epochs`` at ``--distill-lr``,
  best epoch on held-out calibration rows; off by default: +0.0014 measured, see the docs).
* ``digits-resnet``: ``python -m workbench compress digits-resnet --method prune --structured
  --ratio 0.5 --finetune 10 --json``: each coupled group's channels before/after, accuracy.

Prints JSON and writes the tables to ``docs/results/structured.md``.
Run: ``.venv/bin/python benchmarks/structured.py [--no-write] [--skip-resnet]`` (several minutes on 2 threads).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import workbench as wb
from workbench.measure import count_params
from workbench.methods.head_pruning import find_blocks, linear_params
from workbench.recovery.blockwise import reconstruct_blocks
from workbench.recovery.embedding_distill import distill_embeddings
from workbench.recovery.refit import refit_projections
from workbench.registry import get_recipe
from workbench.zoo.minilm import CALIBRATION_SETS, augment_rows
from workbench.results import dumps

sys.path.insert(0, str(Path(__file__).parent))
from doc_results import markdown_table, write_section  # noqa: E402

SENTENCES = 64


def paired_latency(dense, pruned, inputs, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median ms of ``model(inputs)`` for both models, timed alternately (each round: one run of each)."""
    times = {id(dense): [], id(pruned): []}
    with torch.inference_mode():
        for model in (dense, pruned):
            for _ in range(warmup):
                model(inputs)
        for _ in range(repeats):
            for model in (dense, pruned):
                start = time.perf_counter()
                model(inputs)
                times[id(model)].append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[id(dense)]), statistics.median(times[id(pruned)])


def minilm(ratio: float, threads: int, repeats: int, epochs: int, lr: float, distill_epochs: int = 0,
           distill_lr: float = 1e-4, calibration_set: str = "extended", plan_set: str = "default",
           augment: float = 0.15, global_ranking: bool = False, max_ratio: float = 0.9) -> dict:
    torch.set_num_threads(threads)
    task = wb.load("minilm", calibration=plan_set)
    start = time.perf_counter()
    plan = get_recipe("prune")(task.model, task=task, ratio=ratio, structured=True, global_ranking=global_ranking,
                               max_ratio=max_ratio)
    pruned = wb.apply(task.model, plan)
    plan_s = time.perf_counter() - start
    inputs = task.eval_inputs[:SENTENCES]
    dense_ms, pruned_ms = paired_latency(task.model, pruned, inputs, repeats)
    cosine = task.evaluate(pruned)
    calibration = wb.load("minilm", calibration=calibration_set).train_inputs
    if augment:  # a second copy of the rows with ``augment`` of their tokens replaced (teacher runs on it too)
        calibration = torch.cat([calibration, augment_rows(calibration, share=augment, seed=1)])
    start = time.perf_counter()
    refit = refit_projections(pruned, task.model, calibration)
    refit_s = time.perf_counter() - start
    start = time.perf_counter()
    tuned = reconstruct_blocks(pruned, task.model, calibration, epochs=epochs, lr=lr, progress=False)
    blockwise_s = time.perf_counter() - start
    tuned_dense_ms, tuned_ms = paired_latency(task.model, tuned.model, inputs, max(5, repeats // 3))
    before, after = find_blocks(task.model), find_blocks(pruned)
    distilled = {}
    if distill_epochs:
        start = time.perf_counter()
        run = distill_embeddings(tuned.model, task.model, calibration, epochs=distill_epochs, lr=distill_lr,
                                 progress=False)
        distilled = {"cosine_distilled": task.evaluate(run.model), "distill_epochs": distill_epochs,
                     "distill_lr": distill_lr, "distill_best_epoch": run.best_epoch,
                     "distill_s": time.perf_counter() - start}
    return {**distilled, "allocation": "global" if global_ranking else "uniform", "max_ratio": max_ratio,
            "calibration_set": calibration_set, "plan_set": plan_set, "augment": augment,
            "calibration_rows": len(calibration), "ratio": ratio, "threads": threads, "sentences": len(inputs), "repeats": repeats,
            "linear_params_kept": sum(linear_params(pruned, b) for b in after) / sum(linear_params(task.model, b) for b in before),
            "params": [count_params(task.model), count_params(pruned)],
            "blocks": [{"block": b.name, "heads_before": b.heads, "heads_after": a.heads,
                        "ffn_before": b.width, "ffn_after": a.width} for b, a in zip(before, after)],
            "dense_ms": dense_ms, "pruned_ms": pruned_ms, "speedup": dense_ms / pruned_ms,
            "tuned_ms": tuned_ms, "tuned_dense_ms": tuned_dense_ms, "cosine_dense": task.evaluate(task.model), "cosine_pruned": cosine,
            "cosine_refit": task.evaluate(refit), "refit_s": refit_s,
            "cosine_blockwise": task.evaluate(tuned.model), "blockwise_epochs": epochs, "blockwise_lr": lr,
            "plan_s": plan_s, "blockwise_s": blockwise_s}


def resnet(threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "workbench", "compress", "digits-resnet", "--method", "prune", "--structured",
               "--ratio", "0.5", "--finetune", "10", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    result = json.loads(done.stdout)
    return {"command": " ".join(command[1:]), "groups": result["groups"], "accuracy_before": result["before"]["metric"],
            "accuracy_after": result["after"]["metric"], "params": [result["before"]["params"], result["after"]["params"]]}


def minilm_table(r: dict) -> str:
    rows = [["dense", r["params"][0], "1.000", f"{r['dense_ms']:.1f}", "1.00x", f"{r['cosine_dense']:.4f}"],
            [f"heads + FFN pruned ({r['ratio']:g})", r["params"][1], f"{r['linear_params_kept']:.3f}",
             f"{r['pruned_ms']:.1f}", f"{r['speedup']:.2f}x", f"{r['cosine_pruned']:.4f}"],
            ["least-squares refit of the output projections (no training)", r["params"][1], f"{r['linear_params_kept']:.3f}", "",
             "", f"{r['cosine_refit']:.4f}"],
            [f"block-wise reconstruction ({r['blockwise_epochs']} epochs, lr {r['blockwise_lr']:g})", r["params"][1],
             f"{r['linear_params_kept']:.3f}", f"{r['tuned_ms']:.1f}", f"{r['tuned_dense_ms'] / r['tuned_ms']:.2f}x",
             f"{r['cosine_blockwise']:.4f}"]]
    if "cosine_distilled" in r:
        rows.append([f"block-wise, then end-to-end embedding distillation ({r['distill_epochs']} epochs, lr "
                     f"{r['distill_lr']:g}, best epoch {r['distill_best_epoch']})", r["params"][1],
                     f"{r['linear_params_kept']:.3f}", "", "", f"{r['cosine_distilled']:.4f}"])
    blocks = markdown_table(["block", "heads", "FFN width"],
                            [[b["block"], f"{b['heads_before']} -> {b['heads_after']}", f"{b['ffn_before']} -> {b['ffn_after']}"]
                             for b in r["blocks"]])
    return (f"CPU, {r['threads']} threads, one forward pass on {r['sentences']} evaluation sentences, median of "
            f"{r['repeats']} runs after warm-up, dense and pruned timed alternately in the same run. Cosine: mean "
            f"cosine to the original embeddings on the unseen-topic evaluation sentences. "
            + ("Units of all blocks ranked together (global allocation: --ratio of all the encoder's Linear "
               f"parameters, each block keeping at least one head and {1 - r['max_ratio']:g} of its FFN units). "
               if r.get("allocation") == "global" else "Every block keeps --ratio of its Linear parameters. ")
            + f"Units ranked on the "
            f"{r.get('plan_set', 'default')} calibration set; refit, reconstruction and distillation on the "
            f"{r.get('calibration_set', 'default')} set ({r.get('calibration_rows', 727)} rows"
            + (f", half of them with {r['augment']:g} of the tokens replaced by random wordpieces" if r.get("augment") else "")
            + f"). Plan "
            f"{r['plan_s']:.0f} s, least-squares refit {r['refit_s']:.0f} s, block-wise "
            f"reconstruction {r['blockwise_s']:.0f} s"
            + (f", embedding distillation {r['distill_s']:.0f} s" if "distill_s" in r else "") + ".\n\n"
            + markdown_table(["model", "params", "encoder Linears kept", "latency ms", "speed-up", "cosine"], rows)
            + "\n\n" + blocks)


def resnet_table(r: dict) -> str:
    rows = [[g["root"], g["channels_before"], g["channels_after"]] for g in r["groups"]]
    return (f"`python {r['command']}`: accuracy {r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f}, "
            f"params {r['params'][0]} -> {r['params'][1]}.\n\n" + markdown_table(["group root", "channels before",
                                                                                    "channels after"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--blockwise-epochs", type=int, default=12)
    parser.add_argument("--blockwise-lr", type=float, default=1e-3)
    parser.add_argument("--distill-epochs", type=int, default=0,
                        help="end-to-end embedding distillation after block-wise (0: skip; +0.001 cosine measured)")
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--calibration", choices=CALIBRATION_SETS, default="extended",
                        help="MiniLM calibration rows for the refit, block-wise reconstruction and distillation: "
                             "extended (2727 rows, 117 topics; +0.020 cosine at 12 epochs measured on its earlier "
                             "1727 rows) or default (727 rows)")
    parser.add_argument("--plan-calibration", choices=CALIBRATION_SETS, default="default",
                        help="MiniLM calibration rows the heads and FFN units are ranked on")
    parser.add_argument("--augment", type=float, default=0.15,
                        help="add a copy of the calibration rows with this share of tokens replaced by random "
                             "wordpieces (workbench.zoo.minilm.augment_rows; 0: off; +0.004 measured at equal "
                             "row-passes on the extended set)")
    parser.add_argument("--allocation", choices=["global", "uniform"], default="global",
                        help="MiniLM: global (units of all blocks ranked together by output energy per parameter, "
                             "normalised per block: --ratio of all the encoder's Linears; see the docs' table) or "
                             "uniform (each block keeps --ratio of its own Linears)")
    parser.add_argument("--max-ratio", type=float, default=0.9,
                        help="--allocation global: the largest fraction of one block's FFN units that may go")
    parser.add_argument("--skip-resnet", action="store_true")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    args = parser.parse_args()
    results = {"minilm": minilm(args.ratio, args.threads, args.repeats, args.blockwise_epochs, args.blockwise_lr,
                                 args.distill_epochs, args.distill_lr, args.calibration, args.plan_calibration,
                                 args.augment, args.allocation == "global", args.max_ratio)}
    if not args.skip_resnet:
        results["digits-resnet"] = resnet(args.threads)
    print(dumps(results, indent=1))
    if args.no_write:
        return
    write_section("structured", f"structured minilm ratio={args.ratio:g} threads={args.threads}",
                  minilm_table(results["minilm"]), title=f"MiniLM: heads and FFN width pruned to {args.ratio:g}")
    if "digits-resnet" in results:
        write_section("structured", "structured digits-resnet ratio=0.5 finetune=10", resnet_table(results["digits-resnet"]),
                      title="digits-resnet: coupled channel groups at 0.5, 10 epochs of fine-tuning")


if __name__ == "__main__":
    main()
