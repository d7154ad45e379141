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
  36 layers is built, GPTQ and activation-aware SVD included);
* ``--minilm`` and ``--whole-file`` (alone: only this): the WHOLE saved MiniLM file, embeddings
  included (`whole_file`: GPTQ on the 36 encoder Linears, row-wise codes for the embedding
  tables), written by `workbench.save_compressed`, its size on disk and the mean cosine of the
  model loaded back from it (`workbench.load_compressed`).

With ``--weighted``, each model's table gets a column "joint (weighted)": the same menu with each
layer's proxy losses scaled by its measured weight (`workbench.select._menu.layer_weights` and `weight_menu`, what
``loss="weighted"`` does; one evaluation per layer on the validation split).

With ``--blockwise EPOCHS``, each model's table gets a column "joint + block-wise": the joint
allocator's pick at each budget (the weighted one with ``--weighted``), then `workbench.recovery.reconstruct_blocks` (EPOCHS passes per
block, ``--blockwise-lr``; calibration: the task's training inputs) on it; same bytes.

Run: ``.venv/bin/python benchmarks/byte_budget.py [--minilm] [--blockwise EPOCHS] [--no-write]`` (digits: ~2
minutes on 2 threads).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import workbench as wb  # noqa: E402
from workbench.inventory import embedding_units, matrix_layers  # noqa: E402
from workbench.measure import saved_bytes  # noqa: E402
from workbench.plan import LayerPlan, Plan  # noqa: E402
from workbench.plotting.budget import draw_budget_fronts  # noqa: E402
from workbench.recovery import reconstruct_blocks  # noqa: E402
from workbench.results import dumps  # noqa: E402
from workbench.select import DEFAULT_FAMILIES, build_menu, joint_allocate, joint_fronts  # noqa: E402
from workbench.select._menu import layer_weights, weight_menu  # noqa: E402
from workbench.zoo.minilm import CALIBRATION_SETS, augment_rows  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from doc_results import markdown_table, write_section  # noqa: E402

BUDGETS = (0.0625, 0.094, 0.125, 0.25)
HERE = Path(__file__).resolve().parent
#: The whole-file plan: GPTQ settings of the encoder Linears, bits of the embedding tables' rows.
WHOLE_FILE_LINEARS = {"bits": 4, "group_size": 128, "act_order": True, "sequential": True}
WHOLE_FILE_TABLE_BITS = 4
WHOLE_FILE_GOAL = (13e6, 0.97)  # issue 17: at most 13 MB, mean cosine at least 0.97


def whole_file(name: str = "minilm", linears: dict = WHOLE_FILE_LINEARS,
               table_bits: int = WHOLE_FILE_TABLE_BITS) -> dict:
    """Size on disk (bytes) of the whole saved model and the metric of the model loaded back."""
    task = wb.load(name)
    model = task.model
    layers = [info.name for info in matrix_layers(model) if "encoder" in info.name]
    tables = [unit[0] for unit, _ in embedding_units(model)[0] if len(unit) == 1]
    plan = Plan({**{n: LayerPlan("gptq", dict(linears)) for n in layers},
                 **{n: LayerPlan("quant_embedding", {"bits": table_bits}) for n in tables}})
    start = time.perf_counter()
    built = wb.apply(model, plan, calibration_inputs=task.calibration_inputs())
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        path = wb.save_compressed(Path(folder) / f"{name}.safetensors", built, plan, name)
        file_bytes = path.stat().st_size
        loaded = wb.load_compressed(path).model
    metric = float(task.evaluate(loaded))
    return {"model": name, "linears": {"layers": len(layers), "gptq": dict(linears)},
            "tables": {"names": tables, "bits": table_bits}, "file_bytes": file_bytes,
            "original_file_bytes": saved_bytes(model), "metric": metric, "metric_name": task.metric_name,
            "original_metric": float(task.evaluate(model)), "build_s": build_s,
            "goal_met": file_bytes <= WHOLE_FILE_GOAL[0] and metric >= WHOLE_FILE_GOAL[1]}


def whole_file_table(result: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in result["linears"]["gptq"].items())
    rows = [["whole file (embeddings included)", f"{result['file_bytes'] / 1e6:.2f} MB",
             f"{result['file_bytes'] / result['original_file_bytes']:.3f}", f"{result['metric']:.4f}",
             "met" if result["goal_met"] else "not met"]]
    return (f"{result['model']}: the {result['linears']['layers']} encoder Linears by gptq ({settings}), the "
            f"embedding tables ({', '.join(result['tables']['names'])}) as {result['tables']['bits']}-bit row-wise "
            f"codes; written by `workbench.save_compressed`, size on disk; {result['metric_name']} of the model "
            f"loaded back; original file {result['original_file_bytes'] / 1e6:.1f} MB, built in "
            f"{result['build_s']:.0f} s. Goal: <= 13 MB at >= 0.97.\n\n"
            + markdown_table(["file", "size", "of the original", result["metric_name"], "goal"], rows))


def blockwise_rows(task, calibration_set: str, augment: float) -> torch.Tensor:
    """Block-wise tuning's inputs: the task's training inputs (MiniLM: its ``calibration_set``
    rows), plus a copy with ``augment`` of their tokens replaced by random wordpieces (MiniLM only)."""
    if task.name != "minilm":
        return task.train_inputs if task.train_inputs is not None else task.calibration_inputs()
    rows = wb.load("minilm", calibration=calibration_set).train_inputs
    return torch.cat([rows, augment_rows(rows, share=augment, seed=1)]) if augment else rows


def joint_picks(task, budgets, families, relative_to: str, engine, menu):
    """``(budget, pick, None)`` per budget, or ``(budget, None, point)`` with the ``reason`` a budget is out of reach."""
    for budget in budgets:
        try:
            yield budget, joint_allocate(task, budget, "bytes", families, relative_to=relative_to, engine=engine,
                                         menu=menu), None
        except wb.WorkbenchError as exc:
            yield budget, None, {"budget": budget, "fraction_used": None, "metric": None, "reason": str(exc)}


def joint_blockwise(task, budgets, families, relative_to: str, engine, menu, epochs: int, lr: float,
                    calibration: torch.Tensor, learn_scales: bool = False, sequential: bool = False) -> list[dict]:
    """Per budget: the joint pick, built by `workbench.apply` (``sequential``: its GPTQ layers
    calibrated in forward order on the partly quantized model, same storage), then tuned block by
    block on ``calibration`` rows; its ``fraction_used`` (unchanged), ``metric`` and ``blockwise_s``."""
    points = []
    for budget, pick, failed in joint_picks(task, budgets, families, relative_to, engine, menu):
        if pick is None:
            points.append(failed)
            continue
        plan = pick.as_plan()
        if sequential:
            plan = Plan({name: LayerPlan(c.method, {**c.params, "sequential": True}) if c.method == "gptq" else c
                         for name, c in plan.layers.items()})
        built = wb.apply(task.model, plan, calibration_inputs=task.calibration_inputs())
        start = time.perf_counter()
        tuned = reconstruct_blocks(built, task.model, calibration, epochs=epochs, lr=lr, learn_scales=learn_scales,
                                   progress=False).model
        points.append({"budget": budget, "fraction_used": pick.fraction_used, "metric": float(task.evaluate(tuned)),
                       "metric_built": float(task.evaluate(built)), "blockwise_s": time.perf_counter() - start})
    return points


def joint_points(task, budgets, families, relative_to: str, engine, menu) -> list[dict]:
    """The joint pick at each budget from ``menu``: ``fraction_used`` and ``metric`` (as `joint_fronts`)."""
    return [failed or {"budget": budget, "fraction_used": pick.fraction_used, "metric": pick.metric,
                       "bytes": pick.bytes, "predicted_loss": pick.predicted_loss}
            for budget, pick, failed in joint_picks(task, budgets, families, relative_to, engine, menu)]


def run_model(name: str, budgets, families, relative_to: str = "model", encoder_only: bool = False,
              blockwise: int | None = None, blockwise_lr: float = 3e-4, calibration_set: str = "default",
              augment: float = 0.0, learn_scales: bool = False, sequential: bool = False,
              weighted: bool = False) -> dict:
    task = wb.load(name)
    engine = wb.Engine(task, preview=False, freeze_gc=False)
    layers = [n for n in engine.layers if "encoder" in n] if encoder_only else None
    start = time.perf_counter()
    menu = build_menu(task, families, layers=layers, engine=engine)
    menu_s = time.perf_counter() - start
    fronts = joint_fronts(task, budgets, "bytes", families, relative_to=relative_to, engine=engine, menu=menu)
    start = time.perf_counter()
    joint_allocate(task, budgets[0], "bytes", families, relative_to=relative_to, engine=engine, menu=menu)
    resolve_s = time.perf_counter() - start
    fronts = dict(fronts)
    weights = None
    if weighted:
        start = time.perf_counter()
        menu = weight_menu(menu, layer_weights(engine, task, menu.layers))
        weights = {"layers": dict(zip(menu.layers, menu.weights)), "seconds": time.perf_counter() - start}
        fronts["fronts"] = {**fronts["fronts"],
                            "joint (weighted)": joint_points(task, budgets, families, relative_to, engine, menu)}
    at_10 = joint_allocate(task, 0.10, "bytes", families, relative_to=relative_to, engine=engine, menu=menu)
    if blockwise is not None:
        fronts["fronts"] = {**fronts["fronts"], "joint + block-wise": joint_blockwise(
            task, budgets, families, relative_to, engine, menu, blockwise, blockwise_lr,
            blockwise_rows(task, calibration_set, augment), learn_scales, sequential)}
    return {"model": name, "layers": menu.layers, "options": sum(len(c) for c in menu.choices),
            "refused": menu.refused, "menu_s": menu_s, "resolve_and_evaluate_s": resolve_s, "fronts": fronts,
            "weights": weights,
            "at_10_percent": {"fraction_used": at_10.fraction_used, "metric": at_10.metric, "loss": menu.loss,
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


def weights_line(result: dict) -> str:
    """One sentence on the layer weights of ``loss="weighted"`` (empty without them)."""
    if not result.get("weights"):
        return ""
    weights = result["weights"]["layers"]
    low, high = min(weights, key=weights.get), max(weights, key=weights.get)
    return (f"\n\nLayer weights of the weighted loss (measured in {result['weights']['seconds']:.0f} s): "
            f"{weights[low]:.3g} ({low}) to {weights[high]:.3g} ({high}).")


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
            + weights_line(result)
            + f"\n\nJoint ({at['loss']} loss) at 10% of the bytes: {at['metric']:.4f} using {at['fraction_used']:.3f}; per layer: "
            + ", ".join(f"{name} {c['method']} {c['params'] or ''}".strip() for name, c in at["choices"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["digits-mlp", "digits-cnn"],
                        help="embedded models to run (none: only what --minilm / --whole-file ask)")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES))
    parser.add_argument("--minilm", action="store_true", help="also MiniLM's 36 encoder Linears (slow)")
    parser.add_argument("--whole-file", action="store_true",
                        help="only the whole saved MiniLM file (embeddings included): size and mean cosine")
    parser.add_argument("--blockwise", type=int, metavar="EPOCHS",
                        help="add a column: the joint pick at each budget after block-wise reconstruction")
    parser.add_argument("--blockwise-lr", type=float, default=3e-4, metavar="LR", help="its Adam rate (default 3e-4)")
    parser.add_argument("--blockwise-calibration", choices=CALIBRATION_SETS, default="default",
                        help="MiniLM: the calibration set block-wise tuning runs on (extended: 40 more topics)")
    parser.add_argument("--augment", type=float, default=0.0, metavar="SHARE",
                        help="MiniLM: add a copy of the block-wise rows with SHARE of their tokens replaced")
    parser.add_argument("--learn-scales", action="store_true", help="block-wise: quantization steps train too")
    parser.add_argument("--sequential", action="store_true",
                        help="block-wise column: build the pick's GPTQ layers sequentially first")
    parser.add_argument("--weighted", action="store_true",
                        help="add a column: the joint pick with each layer's loss weighted by its measured "
                             "sensitivity (loss='weighted'); block-wise then starts from it")
    parser.add_argument("--no-whole-file", action="store_true", help="with --minilm: skip the whole-file run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the docs and charts alone")
    args = parser.parse_args()
    families = args.families.split(",")
    runs = [(name, "model", False) for name in args.models] + ([("minilm", "layers", True)] if args.minilm else [])
    if args.whole_file:
        runs = []
    whole = whole_file() if (args.minilm and not args.no_whole_file) or args.whole_file else None
    results = [run_model(name, args.budgets, families, relative_to, encoder, args.blockwise, args.blockwise_lr,
                         args.blockwise_calibration, args.augment, args.learn_scales, args.sequential,
                         args.weighted)
               for name, relative_to, encoder in runs]
    print(dumps(results + ([whole] if whole else []), indent=1))
    if args.no_write:
        return
    if whole:
        write_section("byte-budget", "byte-budget minilm whole-file", whole_file_table(whole),
                      title="minilm: the whole saved file, embeddings included")
    for result in results:
        chart(result, HERE / f"byte_budget_{result['model']}.png")
        write_section("byte-budget", f"byte-budget {result['model']} by=bytes families={args.families}",
                      table(result), title=f"{result['model']}: each family and the joint allocator by bytes")


if __name__ == "__main__":
    main()
