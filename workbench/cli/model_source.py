"""``MODEL [--constructor MODULE:FN] [--data FILE] [--calibration SET]``: the model argument every command shares.

Not a command itself (no ``register``). ``MODEL`` is an embedded model name (see ``models``) or
the path of the user's model: a state_dict ``.pt`` / ``.safetensors`` file with
``--constructor package.module:function`` (a callable returning the ``nn.Module``; the current
folder is importable), or a TorchScript file made of layers the workbench can rebuild as plain
modules (`eager_from_torchscript`: ``nn.Sequential`` chains of Linear, Conv2d, LayerNorm,
activations, Flatten, Dropout); another TorchScript file is refused naming its first such layer.
``--calibration SET`` picks an embedded model's calibration set (minilm: ``default`` or
``extended``, `workbench.zoo.minilm.calibration_topics`). ``--data FILE`` is a ``torch.save``'d
dict of tensors, read with ``torch.load(..., weights_only=True)``:

* ``inputs``: the evaluation inputs ``(n, ...)`` (required);
* ``targets``: their labels ``(n, ...)`` (optional);
* ``train_inputs`` / ``train_targets``: a training split for fine-tuning, distillation, QAT,
  sensitivity and allocation (optional; targets need inputs).

`load_task` turns them into a `Task` through ``workbench.load(path, constructor=...,
eval_data=..., train_data=...)``; bad input is a one-line `WorkbenchError` (exit status 2).
"""
from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.zoo import Task, available_models, load, model_options
from workbench.zoo.user import load_model, load_user
from workbench.zoo.hf import is_model_folder

#: keys a ``--data`` file may hold, required first
DATA_KEYS = ("inputs", "targets", "train_inputs", "train_targets")


def add_model_arguments(parser, default: str | None = None) -> None:
    """The positional ``model`` (optional when ``default`` is given) and ``--constructor``/``--data``."""
    where = ("embedded model name (see `models`), or the path of your model: a state_dict .pt/.safetensors "
             "file (with --constructor), a TorchScript file (then --data), or a local Hugging Face folder "
             "(then --texts or --data)")
    if default is None:
        parser.add_argument("model", help=where)
    else:
        parser.add_argument("model", nargs="?", default=default, help=f"{where}; default {default}")
    parser.add_argument("--constructor", metavar="MODULE:FN",
                        help="for a state_dict file: the function building the model, e.g. mynet:build "
                             "(imported from the current folder or PYTHONPATH)")
    parser.add_argument("--data", metavar="FILE",
                        help="torch.save'd dict of tensors: inputs, and optionally targets, train_inputs, "
                             "train_targets (read with weights_only=True)")
    parser.add_argument("--calibration", metavar="SET",
                        help="for an embedded model with calibration sets (minilm): default (727 rows) or extended "
                             "(2727 rows, 80 more topics)")
    parser.add_argument("--texts", metavar="FILE.txt",
                        help="for a Hugging Face folder: evaluation texts, one per line, tokenized with the "
                             "folder's tokenizer")


def read_data(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``--data`` file (see the module doc); anything else is refused, unexecuted."""
    path = Path(path)
    accepted = f"dict of tensors with keys {', '.join(DATA_KEYS)} ('inputs' required)"
    if not path.is_file():
        raise WorkbenchError(f"--data {str(path)!r}: no such file; expected a torch.save'd {accepted}")
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WorkbenchError(
            f"--data {str(path)!r} refused: unpickling it would run code or build arbitrary Python objects "
            f"({_plain_text(str(exc))}); it must be a torch.save'd {accepted}") from None
    except Exception as exc:  # noqa: BLE001  (not a torch file, truncated, ...)
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise WorkbenchError(f"--data {str(path)!r} is not a file torch can read ({first}); "
                             f"it must be a torch.save'd {accepted}") from None
    if not isinstance(data, dict):
        raise WorkbenchError(f"--data {str(path)!r} holds a {type(data).__name__}; it must be a {accepted}")
    unknown = sorted(str(k) for k in data if k not in DATA_KEYS)
    if unknown:
        raise WorkbenchError(f"--data {str(path)!r} has unknown key(s) {', '.join(map(repr, unknown))}; "
                             f"it must be a {accepted}")
    not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WorkbenchError(f"--data {str(path)!r}: {', '.join(not_tensors)} not a tensor; it must be a {accepted}")
    if "inputs" not in data:
        raise WorkbenchError(f"--data {str(path)!r} has no 'inputs'; it must be a {accepted}")
    if "train_targets" in data and "train_inputs" not in data:
        raise WorkbenchError(f"--data {str(path)!r} has 'train_targets' without 'train_inputs'; it must be a {accepted}")
    return data


def _plain_text(message: str) -> str:
    """The first line of ``message``, ANSI escapes (torch's bold text) removed, at most 160 characters."""
    return re.sub(r"\x1b\[[0-9;]*m", "", message.splitlines()[0] if message else "")[:160]


def import_constructor(spec: str) -> Callable[[], nn.Module]:
    """``"package.module:function"`` -> a callable whose failures are one-line `WorkbenchError`s.

    The current folder is importable (as with ``python -m``), also from the ``workbench`` script."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise WorkbenchError(f"--constructor {spec!r} must look like MODULE:FUNCTION, e.g. mynet:build")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001  (the user's module may fail in any way while importing)
        raise WorkbenchError(f"--constructor {spec!r} cannot be imported ({type(exc).__name__}: {exc}); give "
                             "MODULE:FUNCTION importable from the current folder or PYTHONPATH") from None
    if not callable(function):
        raise WorkbenchError(f"--constructor {spec!r} is a {type(function).__name__}, not a function returning the model")

    def build() -> nn.Module:
        try:
            return function()
        except Exception as exc:  # noqa: BLE001  (the user's code)
            raise WorkbenchError(f"--constructor {spec!r} failed when called with no arguments "
                                 f"({type(exc).__name__}: {exc})") from None

    build.__name__ = attr
    return build


def _conv2d(m) -> nn.Module:
    return nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                     dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)


#: how each TorchScript layer (by its ``original_name``) is rebuilt as the plain module it came from
REBUILDERS: dict[str, Callable[[torch.jit.ScriptModule], nn.Module]] = {
    "Linear": lambda m: nn.Linear(m.in_features, m.out_features, bias=m.bias is not None),
    "Conv2d": _conv2d,
    "LayerNorm": lambda m: nn.LayerNorm(m.normalized_shape, eps=m.eps, elementwise_affine=m.weight is not None),
    "ReLU": lambda m: nn.ReLU(), "Tanh": lambda m: nn.Tanh(), "Sigmoid": lambda m: nn.Sigmoid(),
    "GELU": lambda m: nn.GELU(approximate=m.approximate), "Identity": lambda m: nn.Identity(),
    "Flatten": lambda m: nn.Flatten(m.start_dim, m.end_dim), "Dropout": lambda m: nn.Dropout(m.p),
}


def eager_from_torchscript(script: torch.jit.ScriptModule, inputs: torch.Tensor, source: str) -> nn.Module:
    """The plain ``nn.Module`` a TorchScript ``script`` was made from, weights copied, in eval mode.

    Rebuilt: ``nn.Sequential`` (nested) of the layers in `REBUILDERS`; a module with its own
    scripted ``forward`` cannot be rebuilt and is refused by name. The rebuilt model must
    reproduce ``script``'s output on the first of ``inputs`` ``(n, ...)`` (else refused): compressing it then
    means compressing the file's model."""
    def rebuild(module, name: str) -> nn.Module:
        kind = module.original_name
        if kind == "Sequential":
            return nn.Sequential(*(rebuild(child, f"{name}.{key}" if name else key)
                                   for key, child in module.named_children()))
        if kind not in REBUILDERS:
            raise WorkbenchError(
                f"TorchScript {source!r}: layer {name or '(model)'!r} ({kind}) cannot be rebuilt as a plain module "
                f"(rebuilt: Sequential, {', '.join(REBUILDERS)}); save model.state_dict() instead and pass "
                "--constructor MODULE:FN")
        return REBUILDERS[kind](module)

    model = rebuild(script, "")
    model.load_state_dict(script.state_dict(), strict=True)
    model.eval()
    with torch.no_grad():
        try:
            same = torch.allclose(model(inputs[:1]), script(inputs[:1]), rtol=1e-5, atol=1e-6)
        except Exception as exc:  # noqa: BLE001  (the data's shape decides; reported with it)
            raise WorkbenchError(f"--data inputs of shape {tuple(inputs.shape)} do not fit {source!r}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}") from None
    if not same:
        raise WorkbenchError(f"TorchScript {source!r}: the rebuilt plain module does not reproduce the file's "
                             "outputs; save model.state_dict() instead and pass --constructor MODULE:FN")
    return model


def data_options(data: dict[str, torch.Tensor]) -> dict:
    """``{"eval_data", "train_data"}`` for `workbench.load` from a `read_data` dict: ``(inputs,
    targets)`` pairs where targets are given, bare inputs otherwise, no training split if absent."""
    def pair(inputs: str, targets: str):
        if inputs not in data:
            return None
        return (data[inputs], data[targets]) if targets in data else data[inputs]
    return {"eval_data": pair("inputs", "targets"), "train_data": pair("train_inputs", "train_targets")}


def load_task(args) -> Task:
    """A `Task` from ``args.model`` and, for a path, ``args.constructor`` and ``args.data``."""
    constructor, data_file = getattr(args, "constructor", None), getattr(args, "data", None)
    texts, calibration = getattr(args, "texts", None), getattr(args, "calibration", None)
    if calibration is not None and (args.model not in available_models()
                                    or "calibration" not in model_options(args.model)):
        with_sets = [m for m in available_models() if "calibration" in model_options(m)]
        raise WorkbenchError(f"--calibration {calibration!r}: {args.model!r} has no calibration sets; only the "
                             f"embedded {', '.join(with_sets)} (your own model's come from --data train_inputs)")
    if args.model in available_models():
        if constructor or data_file or texts:
            flags = " and ".join(f for f, v in (("--constructor", constructor), ("--data", data_file),
                                                ("--texts", texts)) if v)
            verb = "are" if " and " in flags else "is"
            raise WorkbenchError(f"{flags} {verb} for your own model files; the embedded model {args.model!r} "
                                 "brings its own architecture and data")
        return load(args.model, **({"calibration": calibration} if calibration is not None else {}))
    if not Path(args.model).exists():
        raise WorkbenchError(f"unknown model {args.model!r}: not an embedded model ({', '.join(available_models())}) "
                             "and no such file")
    if Path(args.model).is_dir():
        if not is_model_folder(Path(args.model)):
            raise WorkbenchError(f"{args.model!r} is a folder without a config.json: MODEL must be a model file (a "
                                 "state_dict .pt/.safetensors with --constructor MODULE:FN, or a TorchScript file), "
                                 "or a Hugging Face folder written by save_pretrained")
        return _folder_task(args.model, texts, data_file, constructor)
    if texts is not None:
        raise WorkbenchError(f"--texts is for a Hugging Face folder (its tokenizer reads them); {args.model!r} "
                             "is a file: give --data FILE instead")
    if data_file is None:
        raise WorkbenchError(f"{args.model!r} is your own model: give --data FILE, a torch.save'd dict of "
                             f"tensors with keys {', '.join(DATA_KEYS)} ('inputs' required)")
    data = read_data(data_file)
    options = data_options(data)
    if constructor is not None:
        options["constructor"] = import_constructor(constructor)
    if Path(args.model).is_file() and constructor is None:
        model = load_model(args.model, constructor=_needs_constructor(args.model))  # TorchScript, else refused
        if isinstance(model, torch.jit.ScriptModule):
            model = eager_from_torchscript(model, data["inputs"], args.model)
            # load_user, not load: load's first parameter is also called ``name``
            return _cli_words(lambda: load_user(model, name=Path(args.model).stem, **options))
    return _cli_words(lambda: load(args.model, **options))


def _folder_task(folder: str, texts: str | None, data_file: str | None, constructor: str | None) -> Task:
    """A `Task` from a local Hugging Face folder, judged on ``--texts`` or on ``--data``'s inputs."""
    if constructor is not None:
        raise WorkbenchError(f"{folder!r} is a Hugging Face folder: its config.json says which model it is; "
                             "drop --constructor")
    if (texts is None) == (data_file is None):
        raise WorkbenchError(f"{folder!r} is a Hugging Face folder: give exactly one of --texts FILE.txt "
                             "(one text per line) or --data FILE (token ids as 'inputs')")
    if texts is not None:
        return _cli_words(lambda: load(folder, texts=texts))
    options = data_options(read_data(data_file))
    return _cli_words(lambda: load(folder, **options))


#: the API's argument names in its messages, as the command line spells them
_API_WORDS = {"eval_data ": "--data inputs ", "train_data ": "--data train_inputs "}


def _cli_words(build: Callable[[], Task]) -> Task:
    """``build()``, its refusals worded with the flags the user typed (``eval_data`` -> ``--data inputs``)."""
    try:
        return build()
    except WorkbenchError as exc:
        message = str(exc)
        for api, flag in _API_WORDS.items():
            if message.startswith(api):
                raise WorkbenchError(flag + message[len(api):]) from None
        if message.startswith("no file at"):  # a folder: wb.load reads no Hugging Face folder (yet)
            raise WorkbenchError(f"{message}: MODEL must be a model file (a state_dict .pt/.safetensors with "
                                 "--constructor MODULE:FN, or a TorchScript file), not a folder") from None
        raise


def _needs_constructor(path: str) -> Callable[[], nn.Module]:
    """Called only when ``path`` holds a state_dict and no ``--constructor`` was given: refuse."""
    def refuse() -> nn.Module:
        raise WorkbenchError(f"{path!r} holds weights only (a state_dict); say which model they belong to with "
                             "--constructor MODULE:FN (a function returning the nn.Module), or give a TorchScript file")
    return refuse


def is_embedded(args) -> bool:
    """Whether ``args.model`` names an embedded model (else: the user's file)."""
    return args.model in available_models()
