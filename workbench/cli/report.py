"""``python -m workbench report MODEL [--budget B] --out DIR``: the full study, written as a page.

Writes ``DIR/index.html`` (self-contained), ``DIR/results.json`` and ``DIR/models/`` (the chosen
model as safetensors and ONNX, the original as ONNX). An unwritable ``DIR`` is refused before any
work starts. ``--fast`` runs a reduced study (smoke tests).
"""
from __future__ import annotations

from workbench.cli.model_source import add_model_arguments, load_task
from workbench.cli.output import emit


def run(args) -> int:
    from workbench.export import check_writable_dir
    from workbench.report import StudyConfig, write_report

    check_writable_dir(args.out, create=True)  # fail before loading or training anything
    task = load_task(args)
    options = {"onnx": not args.no_onnx}
    if args.threads is not None:
        options["threads"] = args.threads
    config = StudyConfig.fast(**options) if args.fast else StudyConfig(**options)
    written = write_report(task, args.out, args.budget, config)
    results = written["study"].results
    summary = {"index": str(written["index"]), "results": str(written["results"]),
               "models": str(written["models"]), "skipped": results.get("skipped", []),
               "compare": results.get("measures", {}).get("compare")}
    compare = summary["compare"] or {}
    text = f"wrote {summary['index']} and {summary['results']}"
    if compare:
        flops = "not counted" if compare["flop_ratio"] is None else f"{compare['flop_ratio']:.2f}x"
        text += (f"\nchosen model: {compare['param_ratio']:.2f}x fewer params, FLOP ratio "
                 f"{flops}, measured speed-up {compare['speedup_batch1']:.2f}x (batch 1) / "
                 f"{compare['speedup_large']:.2f}x (large batch), metric change {compare['metric_change']:+.4f}")
    for row in summary["skipped"]:
        text += f"\nskipped {row['stage']}: {row['reason']}"
    emit(summary, args.json, text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="run the full study and write an HTML report")
    add_model_arguments(parser, default="digits-mlp")
    parser.add_argument("--budget", type=float, default=0.3,
                        help="fraction of the original's parameters the chosen model may keep (default 0.3)")
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--threads", type=int, help="intra-op threads for latency (default 1)")
    parser.add_argument("--fast", action="store_true", help="a reduced study (seconds, for smoke tests)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX exports")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)
