"""The best model for a byte budget: every family alone and the joint allocator, at each budget.

For each model and budget (a fraction of the fp32 state-dict bytes), prints as JSON what each
single family (`workbench.select.FAMILIES`) and the joint allocator (one option per layer across
all of them, multiple-choice knapsack on the proxy loss) reach: the fraction of the bytes really
used and the task's metric, measured by the engine on the test data. Writes the table to
`docs/results/byte-budget.md` and one chart per model next to this script
(``byte_budget_<model>.png``; the results pages hold tables, not images).

* digits-mlp / digits-cnn: the budget counts the whole model (biases included);
* ``--minilm``: MiniLM's 36 encoder Linears, the budget a fraction of THEIR fp32 bytes (the
  embeddings, never compressed here, not counted), as in issue 17; slow on CPU (every option of
  36 layers is built, GPTQ and activation-aware SVD included).

Run: ``.venv/bin/python benchmarks/byte_budget.py [--minilm] [--no-write]`` (digits: ~2 minutes on 2 threads).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.plotting.budget import draw_budget_fronts  # noqa: E402
from workbench.results import dumps  # noqa: E402
from workbench.select import DEFAULT_FAMILIES, build_menu, joint_allocate, joint_fronts  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from doc_results import markdown_table, write_section  # noqa: E402

BUDGETS = (0.0625, 0.094, 0.125, 0.25)
HERE = Path(__file__).resolve().parent


def run_model(name: str, budgets, families, relative_to: str = "model", encoder_only: bool = False) -> dict:
    task = wb.load(name)
    engine = wb.Engine(task, preview=False, freeze_gc=False)
    layers = [n for n in engine.layers if "encoder" in n] if encoder_only else None
    start = time.perf_counter()
    menu = build_menu(task, families, layers=layers, engine=engine)
    menu_s = time.perf_counter() - start
    fronts = joint_fronts(task, budgets, "bytes", families, relative_to=relative_to, engine=engine, menu=menu)
    at_10 = joint_allocate(task, 0.10, "bytes", families, relative_to=relative_to, engine=engine, menu=menu)
    start = time.perf_counter()
    joint_allocate(task, budgets[0], "bytes", families, relative_to=relative_to, engine=engine, menu=menu)
    return {"model": name, "layers": menu.layers, "options": sum(len(c) for c in menu.choices),
            "refused": menu.refused, "menu_s": menu_s, "resolve_and_evaluate_s": time.perf_counter() - start,
            "fronts": dict(fronts),
            "at_10_percent": {"fraction_used": at_10.fraction_used, "metric": at_10.metric,
                              "original_metric": at_10.original_metric, "choices": at_10.choices}}


def chart(result: dict, path: Path) -> None:
    fronts = result["fronts"]
    fig, ax = plt.subplots(figsize=(8, 5))
    arrays = {}
    for label, points in fronts["fronts"].items():
        kept = [p for p in points if p["metric"] is not None]
        arrays[label] = ([p["fraction_used"] for p in kept], [p["metric"] for p in kept])
    scope = "fp32 bytes of the model" if fronts["relative_to"] == "model" else "fp32 bytes of the layers"
    draw_budget_fronts(ax, arrays, baseline=fronts["original_metric"], xlabel=f"fraction of the {scope}",
                       ylabel=fronts["metric_name"], with_pick=False)
    ax.set_title(f"{result['model']}: each family alone and the joint allocator")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(result: dict) -> str:
    fronts = result["fronts"]
    labels = list(fronts["fronts"])
    header = ["budget", *labels, "best single family"]
    rows = []
    for i, budget in enumerate(fronts["budgets"]):
        cells = []
        for label in labels:
            p = fronts["fronts"][label][i]
            cells.append("—" if p["metric"] is None else f"{p['metric']:.4f} ({p['fraction_used']:.3f})")
        rows.append([f"{budget:g}", *cells, fronts["winners"][i] or "—"])
    at = result["at_10_percent"]
    return (f"{fronts['metric_name']} (fraction of the fp32 bytes used); original {fronts['original_metric']:.4f}; "
            f"{len(result['layers'])} layers, {result['options']} options, menu built in {result['menu_s']:.0f} s, "
            f"a re-solve plus its evaluation {result['resolve_and_evaluate_s'] * 1e3:.0f} ms.\n\n"
            + markdown_table(header, rows)
            + f"\n\nJoint at 10% of the bytes: {at['metric']:.4f} using {at['fraction_used']:.3f}; per layer: "
            + ", ".join(f"{name} {c['method']} {c['params'] or ''}".strip() for name, c in at["choices"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-mlp", "digits-cnn"])
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES))
    parser.add_argument("--minilm", action="store_true", help="also MiniLM's 36 encoder Linears (slow)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs and charts alone")
    args = parser.parse_args()
    families = args.families.split(",")
    runs = [(name, "model", False) for name in args.models] + ([("minilm", "layers", True)] if args.minilm else [])
    results = [run_model(name, args.budgets, families, relative_to, encoder) for name, relative_to, encoder in runs]
    print(dumps(results, indent=1))
    if args.no_write:
        return
    for result in results:
        chart(result, HERE / f"byte_budget_{result['model']}.png")
        write_section("byte-budget", f"byte-budget {result['model']} by=bytes families={args.families}",
                      table(result), title=f"{result['model']}: each family and the joint allocator by bytes")


if __name__ == "__main__":
    main()
