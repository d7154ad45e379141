"""``python -m workbench compress MODEL --method M ...``: apply one method, measure before/after."""
from __future__ import annotations

from workbench.cli.output import emit
from workbench.cli.recovery_options import add_recovery_arguments, recover
from workbench.compress import apply
from workbench.errors import WorkbenchError
from workbench.inventory import matrix_layers
from workbench.measure import count_params, measure
from workbench.registry import get_recipe
from workbench.zoo import load


def parse_ranks(items: list[str] | None) -> dict[str, int] | None:
    """``["fc1=32", "fc2=8"] -> {"fc1": 32, "fc2": 8}``."""
    if not items:
        return None
    ranks = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise WorkbenchError(f"--rank {item!r} must look like LAYER=RANK, e.g. fc1=32")
        try:
            ranks[name] = int(value)
        except ValueError:
            raise WorkbenchError(f"--rank {item!r}: rank {value!r} is not an integer") from None
    return ranks


def recipe_options(args) -> dict:
    """The method options the user gave (None-valued flags left out)."""
    options = {
        "ratio": args.ratio, "energy": args.energy, "ranks": parse_ranks(args.rank),
        "layers": args.layers, "bits": args.bits, "scheme": args.scheme,
        "per_channel": args.per_channel or None, "asymmetric": args.asymmetric or None,
        "structured": args.structured or None, "activation_aware": args.activation_aware,
    }
    return {k: v for k, v in options.items() if v is not None}


def layer_rows(original, compressed, plan) -> list[dict]:
    """One row per compressible layer of the original: its method, settings and weights kept."""
    rows = []
    for info in matrix_layers(original):
        choice = plan.layers.get(info.name)
        try:
            after = count_params(compressed.get_submodule(info.name))
        except AttributeError:
            after = None
        rows.append({"name": info.name, "shape": list(info.shape),
                     "method": choice.method if choice else "dense",
                     "settings": dict(choice.params) if choice else {},
                     "params_before": info.params, "params_after": after})
    from workbench.layers.recurrent import recurrent_layers  # GRU/LSTM rows: shape [G*H, in + H]
    for name, rnn in recurrent_layers(original):
        choice = plan.layers.get(name)
        rows.append({"name": name, "shape": [rnn.weight_ih_l0.shape[0], rnn.input_size + rnn.hidden_size],
                     "method": choice.method if choice else "dense",
                     "settings": dict(choice.params) if choice else {},
                     "params_before": count_params(rnn),
                     "params_after": count_params(compressed.get_submodule(name))})
    return rows


def run(args) -> int:
    task = load(args.model)
    recipe = get_recipe(args.method)
    plan = recipe(task.model, task=task, **recipe_options(args))
    compressed = apply(task.model, plan, calibration_inputs=task.calibration_inputs())
    compressed, history = recover(args, task, compressed)  # --finetune / --distill / qat; else unchanged
    result = {"model": args.model, "method": args.method, "plan": plan.to_dict(),
              "before": measure(task.model, task), "after": measure(compressed, task),
              "layers": layer_rows(task.model, compressed, plan)}
    report = getattr(recipe, "report", None)  # a family's extra figures and notes (e.g. sparse latency)
    if report is not None:
        result.update(report(task.model, compressed, task))
    if history is not None:
        result["history"] = history
    if args.out:
        from workbench.export import save_compressed
        result["out"] = str(save_compressed(args.out, compressed, plan, args.model))
    before, after = result["before"], result["after"]
    text = (f"{args.model} {args.method}: {task.metric_name} {before['metric']:.4f} -> {after['metric']:.4f}, "
            f"params {before['params']} -> {after['params']} ({after['params'] / before['params']:.1%}), "
            f"bytes {before['bytes']} -> {after['bytes']}, flops {before['flops']} -> {after['flops']}")
    if history is not None:
        text += f"; after {history['kind']} ({len(history['loss'])} epochs, best {history['best_epoch']})"
    emit(result, args.json, text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("compress", help="compress a model with one method and measure it")
    parser.add_argument("model", help="embedded model name (see `models`)")
    parser.add_argument("--method", required=True, help="svd, prune, quant, int8, tucker, cp, ...")
    parser.add_argument("--ratio", type=float, help="kept fraction (parameters for svd, weights for prune)")
    parser.add_argument("--energy", type=float, help="svd: keep this fraction of sigma^2 per layer")
    parser.add_argument("--rank", action="append", metavar="LAYER=R", help="svd: rank of one layer (repeat)")
    parser.add_argument("--layers", nargs="+", help="restrict to these layers")
    parser.add_argument("--bits", type=int, help="quantization bit width")
    parser.add_argument("--scheme", help="quantization scheme (uniform, kmeans)")
    parser.add_argument("--per-channel", action="store_true", help="quantize per output channel")
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric quantization (zero point)")
    parser.add_argument("--structured", action="store_true", help="prune whole channels/neurons")
    parser.add_argument("--activation-aware", choices=["whiten", "scale"], help="data-aware SVD")
    add_recovery_arguments(parser)
    parser.add_argument("--out", help="save the compressed model here (.safetensors)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)
