"""Recovery flags of ``compress``: ``--blockwise EPOCHS``, ``--finetune EPOCHS [--distill
--temperature T --alpha A]`` and ``--method qat --bits B --epochs N`` (these three at ``--lr``).
Not a command itself (no ``register``): `workbench.cli.compress` adds these flags and calls
`recover` on the compressed model before measuring it."""
from __future__ import annotations

import math

from torch import nn

from workbench.errors import WorkbenchError

QAT_DEFAULT_EPOCHS = 10
#: Adam learning rate of fine-tuning, distillation and QAT without ``--lr`` (`finetune`'s default).
DEFAULT_LR = 1e-3
#: Adam learning rate of ``--blockwise`` without ``--lr`` (`reconstruct_blocks`'s default).
BLOCKWISE_LR = 3e-4


def add_recovery_arguments(parser) -> None:
    group = parser.add_argument_group("recovering accuracy")
    group.add_argument("--blockwise", type=int, metavar="EPOCHS",
                       help="block-wise reconstruction: tune each block's compressed layers for EPOCHS passes so "
                            "the block reproduces the original's outputs on the calibration inputs (no labels)")
    group.add_argument("--learn-scales", action="store_true",
                       help="--blockwise: also learn the quantization steps (scales) of quantized layers")
    group.add_argument("--finetune", type=int, metavar="EPOCHS",
                       help="fine-tune what the compression left trainable for up to EPOCHS epochs")
    group.add_argument("--epochs", type=int, metavar="N", help="epochs of recovery (qat, or same as --finetune)")
    group.add_argument("--distill", action="store_true", help="fine-tune with the original model as teacher")
    group.add_argument("--temperature", type=float, help="distillation temperature T > 0 (default 4)")
    group.add_argument("--alpha", type=float, help="weight of the soft teacher loss in [0, 1] (default 0.9)")
    group.add_argument("--lr", type=float, metavar="LR",
                       help=f"Adam learning rate of fine-tuning, distillation and QAT (default {DEFAULT_LR:g}), and of "
                            f"--blockwise (default {BLOCKWISE_LR:g}); cosine schedule over the epochs")


def check_recovery_arguments(args) -> None:
    """Refuse, before any work, an ``--lr`` that is not a finite number > 0, or one with nothing
    to train (``--lr`` sets the rate of every recovery given; block-wise without it: 3e-4), and
    ``--learn-scales`` without ``--blockwise``."""
    if getattr(args, "learn_scales", False) and args.blockwise is None:
        raise WorkbenchError("--learn-scales trains the quantization steps during --blockwise EPOCHS; give "
                             "--blockwise (QAT learns its steps already)")
    if args.lr is None:
        return
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise WorkbenchError(f"--lr {args.lr!r} must be a finite number > 0, e.g. 1e-3")
    if args.finetune is None and args.epochs is None and args.method != "qat" and args.blockwise is None:
        raise WorkbenchError(f"--lr {args.lr:g} sets the rate of --finetune EPOCHS, --distill, --method qat or "
                             "--blockwise EPOCHS; give one of them")


def reconstruct(args, task, compressed: nn.Module) -> tuple[nn.Module, list | None]:
    """``(model, stages)`` after ``--blockwise EPOCHS`` (`workbench.recovery.blockwise`), or
    ``(compressed, None)`` without the flag. Calibration: the task's whole training split."""
    if args.blockwise is None:
        return compressed, None
    if args.blockwise < 1:
        raise WorkbenchError(f"--blockwise {args.blockwise}: give the number of passes per block, an integer >= 1")
    from workbench.recovery.blockwise import reconstruct_blocks
    calibration = task.train_inputs if task.train_inputs is not None else task.calibration_inputs()
    lr = BLOCKWISE_LR if args.lr is None else args.lr
    result = reconstruct_blocks(compressed, task.model, calibration, epochs=args.blockwise, lr=lr,
                                learn_scales=bool(getattr(args, "learn_scales", False)))
    return result.model, result.stages


def recover(args, task, compressed: nn.Module) -> tuple[nn.Module, dict | None]:
    """``(model, history)``: the recovered model and its JSON history, or ``(compressed, None)``
    when no recovery flag was given."""
    from workbench.recovery.finetune import distill_finetune, finetune

    if args.finetune is not None and args.epochs is not None and args.finetune != args.epochs:
        raise WorkbenchError(f"--finetune {args.finetune} and --epochs {args.epochs} disagree; give one")
    epochs = args.finetune if args.finetune is not None else args.epochs
    is_qat = args.method == "qat"
    if epochs is None and is_qat:
        epochs = QAT_DEFAULT_EPOCHS
    if epochs is None:
        if args.distill or args.temperature is not None or args.alpha is not None:
            raise WorkbenchError("--distill, --temperature and --alpha need --finetune EPOCHS")
        return compressed, None
    if not args.distill and (args.temperature is not None or args.alpha is not None):
        raise WorkbenchError("--temperature and --alpha set distillation; add --distill")
    lr = DEFAULT_LR if args.lr is None else args.lr
    options = {"epochs": epochs, "lr": lr, "learn_scales": is_qat, "desc": "QAT" if is_qat else "fine-tuning"}
    if args.distill:
        options["desc"] = "distilling"
        result = distill_finetune(compressed, task, temperature=4.0 if args.temperature is None else args.temperature,
                                  alpha=0.9 if args.alpha is None else args.alpha, **options)
    else:
        result = finetune(compressed, task, **options)
    kind = "distill" if args.distill else ("qat" if is_qat else "finetune")
    history = {"kind": kind, "epoch": [h["epoch"] for h in result.history], **result.history_dict(),
               "lr": lr, "metric_split": ("validation (held out from training)" if task.val_inputs is not None
                                 else "validation (held out of the training split)")}
    if args.distill:
        history.update(temperature=4.0 if args.temperature is None else args.temperature,
                       alpha=0.9 if args.alpha is None else args.alpha)
    return result.model, history
