"""Uniform vs energy vs greedy vs convex allocation at 30% of parameters on digits-mlp and digits-cnn.

Choices use the models' held-out validation split (never trained on); accuracy is measured on
the test split. Prints one table row per (model, allocator) and a JSON line with everything.
Run: .venv/bin/python benchmarks/allocation.py [--budget 0.3] [--by params]
"""
import argparse
import json
import time

from doc_results import markdown_table, write_section

import workbench as wb
from workbench.select._allocate import ALLOCATORS, compare_allocators


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--by", default="params", choices=["params", "bytes", "flops"])
    args = parser.parse_args()
    out, doc_rows = {}, []
    print(f"{'model':<11} {'allocator':<8} {'test acc':>8} {'val acc':>8} {'used':>7}  ranks")
    for name in ("digits-mlp", "digits-cnn"):
        task = wb.load(name)
        start = time.perf_counter()
        results = compare_allocators(task, args.budget, args.by, ALLOCATORS, progress=False)
        seconds = time.perf_counter() - start
        print(f"{name:<11} {'original':<8} {task.evaluate():>8.4f}")
        doc_rows.append([f"`{name}`", "original", f"{task.evaluate():.4f}", "", "1.000", "all dense"])
        for allocator, r in results.items():
            ranks = ", ".join(f"{k}={v if v is not None else 'dense'}" for k, v in r.ranks.items())
            print(f"{name:<11} {allocator:<8} {r.metric:>8.4f} {r.validation_metric:>8.4f} {r.fraction_used:>7.3f}  {ranks}")
            doc_rows.append([f"`{name}`", allocator, f"{r.metric:.4f}", f"{r.validation_metric:.4f}",
                             f"{r.fraction_used:.3f}", ranks])
        best = max((a for a in results if a != "uniform"), key=lambda a: results[a].metric)
        verdict = "beats" if results[best].metric > results["uniform"].metric else "DOES NOT beat"
        print(f"{name}: best allocator {best} {results[best].metric:.4f} vs uniform "
              f"{results['uniform'].metric:.4f} ({verdict} uniform); {seconds:.1f} s")
        out[name] = {"original": task.evaluate(), "seconds": seconds,
                     **{a: {"metric": r.metric, "validation_metric": r.validation_metric,
                            "fraction_used": r.fraction_used, "ranks": r.ranks} for a, r in results.items()}}
    print(json.dumps({"budget": args.budget, "by": args.by, "results": out}))
    header = ["model", "allocator", "test accuracy", "validation accuracy", f"{args.by} used", "ranks"]
    write_section("allocation", f"allocation.py --budget {args.budget} --by {args.by}",
                  markdown_table(header, doc_rows),
                  title=f"benchmarks/allocation.py --budget {args.budget} --by {args.by}")


if __name__ == "__main__":
    main()
