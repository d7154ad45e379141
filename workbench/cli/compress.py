"""``python -m workbench compress MODEL --method M ... | --plan FILE``: apply one method (or a saved
plan), optionally recover, measure before/after."""
from __future__ import annotations

import inspect

from torch import nn

from workbench.cli.model_source import add_model_arguments, is_embedded, load_task
from workbench.cli.output import emit
from workbench.cli.plan_file import check_fits, read_plan_file
from workbench.cli.recovery_options import add_recovery_arguments, check_recovery_arguments, reconstruct, recover
from workbench.compress import apply
from workbench.errors import WorkbenchError
from workbench.inventory import offered_units
from workbench.measure import count_params, measure
from workbench.registry import get_recipe


def parse_ranks(items: list[str] | None) -> dict[str, int | tuple[int, int]] | None:
    """``["fc1=32", "conv2=24x12"] -> {"fc1": 32, "conv2": (24, 12)}`` (a pair: Tucker's
    (rank_out, rank_in), or a GRU/LSTM's (rank_ih, rank_hh))."""
    if not items:
        return None
    ranks = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise WorkbenchError(f"--rank {item!r} must look like LAYER=RANK or LAYER=AxB, e.g. fc1=32, conv2=24x12")
        try:
            parts = [int(v) for v in value.lower().split("x")]
        except ValueError:
            raise WorkbenchError(f"--rank {item!r}: rank {value!r} is not an integer or a pair AxB") from None
        if len(parts) > 2:
            raise WorkbenchError(f"--rank {item!r}: at most two ranks (AxB)")
        ranks[name] = parts[0] if len(parts) == 1 else tuple(parts)
    return ranks


# CLI flag of each recipe option, for the message when a flag does not apply to the method
FLAGS = {"ratio": "--ratio", "energy": "--energy", "ranks": "--rank", "layers": "--layers", "bits": "--bits",
         "scheme": "--scheme", "per_channel": "--per-channel", "group_size": "--group-size", "awq": "--awq",
         "act_order": "--act-order", "asymmetric": "--asymmetric", "clip": "--clip",
         "structured": "--structured", "activation_aware": "--activation-aware", "estimate": "--estimate",
         "sequential": "--sequential", "importance": "--importance", "round_to": "--round-to",
         "global_ranking": "--global-ranking", "max_ratio": "--max-ratio", "n": "--n", "m": "--m",
         "min_heads": "--min-heads"}


def check_options_apply(method: str, recipe, options: dict) -> None:
    """Refuse a flag the method's recipe does not take (it would be ignored silently)."""
    accepted = set(getattr(recipe, "options", ()))
    if not accepted:
        accepted = {name for name, p in inspect.signature(recipe).parameters.items()
                    if p.kind is p.KEYWORD_ONLY}
    unused = [FLAGS.get(k, k) for k in options if k not in accepted]
    if unused:
        takes = ", ".join(sorted(FLAGS.get(k, k) for k in accepted if k in FLAGS)) or "no options"
        raise WorkbenchError(f"{', '.join(unused)} does not apply to --method {method} (it takes: {takes})")


def recipe_options(args) -> dict:
    """The method options the user gave (None-valued flags left out)."""
    options = {
        "ratio": args.ratio, "energy": args.energy, "ranks": parse_ranks(args.rank),
        "layers": args.layers, "bits": args.bits, "scheme": args.scheme,
        "per_channel": args.per_channel or None, "asymmetric": args.asymmetric or None, "clip": args.clip,
        "structured": args.structured or None, "activation_aware": args.activation_aware,
        "estimate": args.estimate, "group_size": args.group_size,
        "awq": args.awq or None, "act_order": args.act_order or None, "sequential": args.sequential or None,
        "importance": args.importance, "round_to": args.round_to,
        "global_ranking": args.global_ranking or None, "max_ratio": args.max_ratio,
        "n": args.n, "m": args.m,
        "min_heads": args.min_heads,
    }
    return {k: v for k, v in options.items() if v is not None}


def _step_of(plan, name: str):
    """The whole-model step of ``plan`` that names layer ``name`` (structured pruning), or None."""
    return next((step for step in plan.steps if name in (step.params.get("layers") or ())), None)


def layer_rows(original, compressed, plan) -> list[dict]:
    """One row per compressible layer of the original: its method, settings and weights kept
    (a tied group offered as one: one row named ``"enc + dec (tied)"``, its shared tensors once)."""
    from workbench.layers.recurrent import recurrent_layers  # GRU/LSTM rows: shape [G*H, in + H]

    entries = [(names, list(info.shape), info.params) for names, info in offered_units(original)]
    entries += [((name,), [rnn.weight_ih_l0.shape[0], rnn.input_size + rnn.hidden_size], count_params(rnn))
                for name, rnn in recurrent_layers(original)]
    rows = []
    for names, shape, before in entries:
        name = names[0]
        choice = plan.layers.get(name) or _step_of(plan, name)
        try:
            after = count_params(nn.ModuleList([compressed.get_submodule(n) for n in names]))  # shared once
        except AttributeError:
            after = None
        # a head-pruning step's per-block index lists are in the report's "blocks" rows, not on each layer
        settings = {k: v for k, v in choice.params.items()
                    if k not in ("layers", "blocks", "heads_removed", "ffn_removed")} if choice else {}
        rows.append({"name": name if len(names) == 1 else f"{' + '.join(names)} (tied)", "shape": shape,
                     "method": choice.method if choice else "dense",
                     "settings": settings, "params_before": before, "params_after": after})
    return rows


def left_dense(original, plan) -> list[dict]:
    """``[{name, type, reason}]``: layers holding weights that ``plan`` leaves as they are, and why;
    a tied group the recipe could not serve is one row (``plan.left_dense``'s reason)."""
    from workbench.zoo.user import skipped_layers

    touched = set(plan.layers) | {n for step in plan.steps for n in (step.params.get("layers") or ())}
    if any(not step.params.get("layers") for step in plan.steps):
        return []  # a step over the whole model (BatchNorm folding, fusion): it says what it changed
    rows = [row for row in skipped_layers(original) if row["name"] not in touched]
    listed = {row["name"] for row in rows}
    rows += [{"name": " + ".join(names), "type": "tied group", "reason": reason}
             for names, reason in plan.left_dense.items() if not listed & set(names)]
    noted = {name for names in plan.left_dense for name in names} | listed
    rows += [{"name": " + ".join(names) if len(names) > 1 else names[0],
              "type": "tied group" if len(names) > 1 else type(original.get_submodule(names[0])).__name__,
              "reason": "not in the plan: not named, or at this setting its compressed form would not "
                        "be smaller (or this method does not handle it)"}
             for names, _ in offered_units(original) if not touched & set(names) and not noted & set(names)]
    return rows


def allocated(task, options: dict):
    """``--allocate``: the ``svd`` ranks of ``--ratio`` share ONE budget over the Linear layers
    (`workbench.select.aware_budget.allocated_plan`, data-aware: ``--activation-aware``, else whiten)."""
    from workbench.select.aware_budget import allocated_plan

    return allocated_plan(task.model, task.calibration_inputs(), options["ratio"],
                          mode=options.get("activation_aware", "whiten"), layers=options.get("layers"),
                          sequential=bool(options.get("sequential")))


def check_plan_or_method(args, options: dict) -> None:
    """Before any work: exactly one of ``--method`` and ``--plan`` (a plan holds its own methods
    and settings); ``--allocate`` only as ``--method svd --ratio R`` (+ ``--layers``,
    ``--activation-aware``, ``--sequential``)."""
    if args.plan is None and args.method is None:
        raise WorkbenchError("give --method M (with its options) or --plan FILE (a saved plan)")
    given = (["--method"] if args.method is not None else []) + [FLAGS.get(k, k) for k in options]
    given += ["--allocate"] if args.allocate else []
    if args.plan is not None and given:
        raise WorkbenchError(f"--plan FILE holds the methods and settings; it cannot be combined with {', '.join(given)}")
    if args.allocate:
        if args.method != "svd":
            raise WorkbenchError(f"--allocate shares an svd budget across layers; it does not apply to --method {args.method}")
        others = [FLAGS[k] for k in options if k not in ("ratio", "layers", "activation_aware", "sequential")]
        if "ratio" not in options or others:
            raise WorkbenchError("--allocate takes --ratio R (the kept fraction of all the Linear weights) and optionally "
                                 f"--layers, --activation-aware, --sequential; got {', '.join(others) or 'no --ratio'}")


def run(args) -> int:
    options = recipe_options(args)
    check_plan_or_method(args, options)
    check_recovery_arguments(args)
    plan_file = read_plan_file(args.plan) if args.plan is not None else None  # before loading the model
    task = load_task(args)
    recipe = None
    if plan_file is not None:
        check_fits(plan_file, task.model, args.model)
        plan = plan_file.plan
    elif args.allocate:
        plan = allocated(task, options)
    else:
        recipe = get_recipe(args.method)
        check_options_apply(args.method, recipe, options)
        plan = recipe(task.model, task=task, **options)
    compressed = apply(task.model, plan, calibration_inputs=task.calibration_inputs())
    compressed, blockwise = reconstruct(args, task, compressed)  # --blockwise; else unchanged
    compressed, history = recover(args, task, compressed)  # --finetune / --distill / qat; else unchanged
    label = args.method if plan_file is None else "plan"
    result = {"model": args.model, "method": label, "plan": plan.to_dict(),
              "before": measure(task.model, task), "after": measure(compressed, task),
              "layers": layer_rows(task.model, compressed, plan), "left_dense": left_dense(task.model, plan)}
    if plan_file is not None:
        result.update(plan_file=plan_file.path, plan_made_for=plan_file.made_for)
    if args.allocate:
        result["allocated"] = True
    report = getattr(recipe, "report", None)  # a family's extra figures and notes (e.g. sparse latency)
    if report is not None:
        result.update(report(task.model, compressed, task, plan) if "plan" in inspect.signature(report).parameters
                      else report(task.model, compressed, task))
    if history is not None:
        result["history"] = history
    if blockwise is not None:
        result["blockwise"] = blockwise
    if args.out:
        from workbench.export import save_compressed
        mine = {} if is_embedded(args) else {"original": task.model, "example_input": task.eval_inputs[:1]}
        result["out"] = str(save_compressed(args.out, compressed, plan, args.model if is_embedded(args) else task.name,
                                            **mine))
    before, after = result["before"], result["after"]
    name = f"plan {plan_file.path}" if plan_file is not None else label + (" allocated" if args.allocate else "")
    text = (f"{args.model} {name}: {task.metric_name} {before['metric']:.4f} -> {after['metric']:.4f}, "
            f"params {before['params']} -> {after['params']} ({after['params'] / before['params']:.1%}), "
            f"bytes {before['bytes']} -> {after['bytes']}, flops {before['flops']} -> {after['flops']}")
    if blockwise is not None:
        tuned = [s for s in blockwise if "best_loss" in s]
        text += (f"; after block-wise reconstruction ({len(tuned)} stages tuned, held-out MSE "
                 f"{sum(s['start_loss'] for s in tuned):.4g} -> {sum(s['best_loss'] for s in tuned):.4g} summed)")
    if history is not None:
        text += f"; after {history['kind']} ({len(history['loss'])} epochs, best {history['best_epoch']})"
    if "speed" in result:
        speed = result["speed"]
        text += (f"\n  measured speed-up {speed['speedup']:.2f}x at batch {speed['batch']}, {speed['threads']} threads "
                 f"(FLOPs {speed['flop_ratio']}x of the original's)")
    for row in result["left_dense"]:
        text += f"\n  left dense: {row['name']} ({row['type']}): {row['reason']}"
    emit(result, args.json, text)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("compress", help="compress a model with one method (or a saved plan) and measure it")
    add_model_arguments(parser)
    parser.add_argument("--method", help="svd, prune, nm, quant, gptq, int8, tucker, cp, ...")
    parser.add_argument("--plan", metavar="FILE",
                        help="apply a saved plan instead of --method: Plan.to_json, allocate/compress --json "
                             "output, or a widget configuration")
    parser.add_argument("--ratio", type=float, help="kept fraction (parameters for svd, weights for prune)")
    parser.add_argument("--energy", type=float, help="svd: keep this fraction of sigma^2 per layer")
    parser.add_argument("--rank", action="append", metavar="LAYER=R",
                        help="rank of one layer (repeat); LAYER=AxB for a pair (tucker: out x in; GRU/LSTM: ih x hh)")
    parser.add_argument("--estimate", choices=["vbmf"], help="tucker: ranks from a VBMF estimate")
    parser.add_argument("--layers", nargs="+", help="restrict to these layers")
    parser.add_argument("--bits", type=int, help="quantization bit width")
    parser.add_argument("--scheme", help="quantization scheme (uniform, kmeans)")
    parser.add_argument("--group-size", type=int, help="gptq: inputs sharing one scale (a divisor of each layer's input width)")
    parser.add_argument("--awq", action="store_true", help="gptq: activation-aware input scaling (AWQ) first")
    parser.add_argument("--act-order", action="store_true",
                        help="gptq: columns in descending order of input energy (static groups, same storage)")
    parser.add_argument("--per-channel", action="store_true", help="quantize per output channel")
    parser.add_argument("--asymmetric", action="store_true", help="asymmetric quantization (zero point)")
    parser.add_argument("--clip", help="quant, uniform: the grid's range from the largest weight (max), the least "
                                       "squared rounding error (mse) or the 99.9th percentile (percentile); "
                                       "default mse up to 4 bits, max above")
    parser.add_argument("--structured", action="store_true",
                        help="prune whole channels/neurons; coupled channels (residual adds, BatchNorm) as one group; "
                             "transformers (BERT, GPT-2, Llama): attention heads and FFN width, --ratio of each block's Linears")
    parser.add_argument("--importance", choices=["magnitude", "taylor", "hessian", "output", "weights"],
                        help="--structured: how a group's channels are ranked (taylor/hessian use the training labels); "
                             "transformers' heads and FFN units: output (energy on calibration data, default) or weights")
    parser.add_argument("--min-heads", type=int,
                        help="--structured on a transformer: attention heads (k/v groups) each block keeps at least")
    parser.add_argument("--round-to", type=int, help="--structured: keep each group's channels in multiples of this")
    parser.add_argument("--global-ranking", action="store_true",
                        help="--structured: one ranking over all groups (--ratio of all channels kept); transformers: "
                             "--ratio of all blocks' Linears, heads and FFN units of every block ranked together")
    parser.add_argument("--max-ratio", type=float,
                        help="--structured --global-ranking: the largest fraction of one group (transformers: of one "
                             "block's FFN units) that may go (default 0.9)")
    parser.add_argument("--n", type=int, help="nm: weights kept in every group of --m consecutive inputs (default 2)")
    parser.add_argument("--m", type=int, help="nm: the group of consecutive inputs, 2..8, dividing each input width (default 4)")
    parser.add_argument("--activation-aware", choices=["whiten", "scale"], help="data-aware SVD")
    parser.add_argument("--sequential", action="store_true",
                        help="data-aware svd: calibrate layer by layer in forward order on the partly compressed model")
    parser.add_argument("--allocate", action="store_true",
                        help="svd --ratio R: R of ALL the Linear weights, ranks allocated per layer from measured "
                             "losses (data-aware; whiten unless --activation-aware scale)")
    add_recovery_arguments(parser)
    parser.add_argument("--out", help="save the compressed model here (.safetensors)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)
