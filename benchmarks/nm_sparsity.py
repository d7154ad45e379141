"""2:4 (and 4:8) semi-structured sparsity on MiniLM's 36 encoder Linears: fidelity, bytes, latency verdict.

Prints as JSON, for each pattern: the mean cosine to the original embeddings on the unseen-topic
evaluation sentences (the MiniLM task's metric, as `benchmarks/byte_budget.py` measures it), the
state-dict payload of the 36 layers before and after, the whole-model speed-up on 64 sentences at
2 threads (original measured in the same run) beside the FLOP ratio, and the per-layer latency
verdict (`workbench.methods.nm_sparsity.model_latency`). Writes the table to
``docs/results/nm-sparsity.md``.

Run: ``.venv/bin/python benchmarks/nm_sparsity.py [--patterns 2:4 4:8] [--no-write]`` (a few minutes on 2 threads).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import workbench as wb
from workbench.inventory import matrix_layers
from workbench.registry import get_recipe
from workbench.methods.nm_sparsity import model_latency
from workbench.methods.pruning import speed_row
from workbench.results import dumps
from workbench.ties import payload_bytes

sys.path.insert(0, str(Path(__file__).parent))
from doc_results import markdown_table, write_section  # noqa: E402


def layer_bytes(model: torch.nn.Module, names: list[str]) -> int:
    return sum(payload_bytes(model.get_submodule(name).state_dict()) for name in names)


def run(pattern: str) -> dict:
    n, m = (int(v) for v in pattern.split(":"))
    task = wb.load("minilm")
    layers = [info.name for info in matrix_layers(task.model) if "encoder" in info.name]
    plan = get_recipe("nm")(task.model, n=n, m=m, layers=layers)
    model = wb.apply(task.model, plan)
    latency = model_latency(model, batch=64, repeats=10)
    return {"pattern": pattern, "layers": len(layers), "metric_name": task.metric_name,
            "mean_cosine": task.evaluate(model),
            "layer_bytes_before": layer_bytes(task.model, layers), "layer_bytes_after": layer_bytes(model, layers),
            "speed": speed_row(task.model, model, task, repeats=10),
            "nm_layers_ms": latency["nm_ms"], "dense_layers_ms": latency["dense_ms"],
            "compact_layers_ms": latency["compact_ms"], "verdict": latency["verdict"]}


def table(results: list[dict]) -> str:
    header = ["pattern", "mean cosine (unseen topics)", "bytes of the 36 Linears", "model speed-up (64 sentences)",
              "FLOP ratio", "36 layers: N:M / dense / ideal ms (batch 64)"]
    rows = [[r["pattern"], f"{r['mean_cosine']:.4f}",
             f"{r['layer_bytes_after']:,} of {r['layer_bytes_before']:,} ({r['layer_bytes_after'] / r['layer_bytes_before']:.1%})",
             f"{r['speed']['speedup']:.2f}x ({r['speed']['original_ms']:.1f} -> {r['speed']['compressed_ms']:.1f} ms, "
             f"{r['speed']['threads']} threads)", f"{r['speed']['flop_ratio']:.2f}",
             f"{r['nm_layers_ms']:.2f} / {r['dense_layers_ms']:.2f} / {r['compact_layers_ms']:.2f}"] for r in results]
    verdicts = "\n".join(f"- **{r['pattern']}**: {r['verdict']}" for r in results)
    return markdown_table(header, rows) + "\n\nVerdicts, as measured:\n\n" + verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs alone")
    args = parser.parse_args()
    results = [run(pattern) for pattern in args.patterns]
    print(dumps(results, indent=1))
    if not args.no_write:
        write_section("nm-sparsity", f"nm-sparsity minilm encoder patterns={','.join(args.patterns)}", table(results),
                      title="MiniLM, 36 encoder Linears")


if __name__ == "__main__":
    main()
