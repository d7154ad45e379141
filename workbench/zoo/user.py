"""The user's own models: ``workbench.load(module_or_path, ...) -> Task``.

Accepted sources:

* an ``nn.Module`` object (e.g. from the notebook);
* a ``torch.save(model.state_dict())`` file or a ``.safetensors`` file, plus ``constructor``: a
  callable (or ``"package.module:function"``) returning the model to load the weights into;
* a TorchScript file (``torch.jit.save``);
* a local Hugging Face model folder (``config.json`` + safetensors weights; `workbench.zoo.hf`),
  loaded with ``local_files_only=True``: nothing is downloaded.

Files are read with ``torch.load(..., weights_only=True)`` or safetensors only: a pickle that
would run code when loaded (e.g. a whole model saved with ``torch.save(model)``) is refused with a
clear message and never executed.

Data: ``eval_data``, ``train_data`` and ``calibration_data`` are each a DataLoader (batches ``x``
or ``(x, y, ...)``), a tensor ``x`` or a pair ``(x, y)``. For a language model, ``texts=`` (a list
or a ``.txt`` file, one text per line) with ``tokenizer=`` gives the evaluation inputs instead: ids
and attention mask ``(n, 2, T)``, padded to the longest text, run through a copy of the model that
passes the mask (`workbench.zoo.masked_text`: outputs at padding are zeros).
Outputs: tensors, tuples, dicts and ``transformers`` ``ModelOutput``s; ``output=`` picks the
judged tensor (`workbench.zoo.outputs`).
Metric: the user's ``metric(outputs, targets) -> float``; without one, perplexity for a causal
language model given token ids (lower is better), else output fidelity: mean cosine similarity of
each sample's output to the original model's output on the same data.

The user's module is kept as it is: it is run in eval mode and each submodule's mode restored.
"""
from __future__ import annotations

import importlib
import inspect
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from workbench.device import model_device, to_device
from workbench.errors import WorkbenchError
from workbench.inventory import inventory
from workbench.layers.recurrent import unsupported_reason
from workbench.zoo.hf import load_folder, text_inputs
from workbench.zoo.masked_text import next_token_targets, with_attention_mask
from workbench.zoo.outputs import OutputChoice, select_output
from workbench.zoo.task import CheckedMetric, Task, check_finite, evaluation_mode
from workbench.ties import fill_tied
from safetensors.torch import load_file

FIDELITY_NAME = "output fidelity (mean cosine to original)"
PERPLEXITY_NAME = "perplexity (exp of next-token cross-entropy)"


def output_fidelity(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity between each sample's flattened output and the reference ``(n, ...)``."""
    a, b = outputs.reshape(len(outputs), -1).double(), reference.reshape(len(reference), -1).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).mean())


# ---- constructing and reading files ---------------------------------------------------------

def resolve_constructor(constructor: Callable[[], nn.Module] | str | None, path: Path) -> nn.Module:
    """Call the user's ``constructor`` (a callable, or ``"module:function"`` to import) -> model."""
    if constructor is None:
        raise WorkbenchError(
            f"{path.name} holds weights only (a state_dict); say which model they belong to with "
            "constructor=MyNet (a callable returning the nn.Module) or constructor='package.module:MyNet'")
    if isinstance(constructor, str):
        module_name, sep, attr = constructor.partition(":")
        if not sep or not module_name or not attr:
            raise WorkbenchError(f"constructor={constructor!r} must look like 'package.module:function'")
        try:
            constructor = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise WorkbenchError(f"constructor={constructor!r} cannot be imported: {exc}") from None
    if not callable(constructor):
        raise WorkbenchError(f"constructor must be callable; got {type(constructor).__name__}")
    model = constructor()
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"constructor returned {type(model).__name__}, not an nn.Module")
    return model


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``torch.save`` file, read without executing any code."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise WorkbenchError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WorkbenchError(
            f"refused to load {path}: unpickling it would run code or build arbitrary Python objects "
            f"({str(exc).splitlines()[0][:200]}). The workbench loads with weights_only=True and never "
            "executes such files. Save the weights instead: torch.save(model.state_dict(), path), "
            "then load(path, constructor=YourModel)") from None
    except Exception as exc:  # noqa: BLE001  (any other failure: not a torch file, or truncated)
        raise WorkbenchError(f"{path} is not a model file torch can read (truncated or another format?): "
                             f"{str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # common checkpoint layout {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WorkbenchError(f"{path} does not hold a state_dict (a dict of tensors); got {type(state).__name__}")
    return state


def fit_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; a mismatch raises, listing missing/unexpected keys and shapes.

    Names that safetensors' ``save_model`` dropped (one of each tied pair) are filled from their
    tie partner first (`workbench.ties.fill_tied`)."""
    state = fill_tied(state, model)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing in the file: {', '.join(missing[:10])}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected[:10])}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:10])}")
        raise WorkbenchError(f"the weights in {source} do not fit {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(state, strict=True)


def load_model(source: Any, constructor: Callable[[], nn.Module] | str | None = None) -> nn.Module:
    """An ``nn.Module`` from a module object, a file path or a Hugging Face folder (see the module
    docstring)."""
    if isinstance(source, nn.Module):
        return source
    path = Path(source)
    if path.is_dir():
        if constructor is not None:
            raise WorkbenchError(f"constructor= is for state_dict / safetensors files; {path} is a folder, "
                                 "built from its config.json")
        return load_folder(path)
    if not path.is_file():
        raise WorkbenchError(f"no file at {str(path)!r}")
    if _is_torchscript(path):
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise WorkbenchError(f"{path} looks like TorchScript but cannot be loaded: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
    state = read_state_dict(path)
    model = resolve_constructor(constructor, path)
    fit_state_dict(model, state, str(path))
    return model


# ---- data ------------------------------------------------------------------------------------

def data_tensors(data: Any, what: str = "eval_data") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets or None)`` from a DataLoader (batches ``x`` or ``(x, y, ...)``), a
    tensor ``x``, or an ``(x, y)`` pair; ``what`` names the argument in errors."""
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        if len(data[0]) != len(data[1]):
            raise WorkbenchError(f"{what} inputs have {len(data[0])} samples but targets {len(data[1])}")
        return data[0], data[1]
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys = [], []
        for batch in data:
            if isinstance(batch, torch.Tensor):
                xs.append(batch)
            elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
                xs.append(batch[0])
                if len(batch) > 1 and isinstance(batch[1], torch.Tensor):
                    ys.append(batch[1])
            else:
                raise WorkbenchError(f"{what}: DataLoader batches must be tensors or (inputs, targets) tuples; "
                                     f"got {type(batch).__name__}")
        if not xs:
            raise WorkbenchError(f"{what}: the DataLoader yielded no batches")
        return torch.cat(xs), (torch.cat(ys) if len(ys) == len(xs) else None)
    raise WorkbenchError(f"{what} must be a DataLoader, a tensor or an (inputs, targets) pair; "
                         f"got {type(data).__name__}")


def check_forward_arguments(model: nn.Module) -> None:
    """Refuse a model whose ``forward`` needs more than the one input tensor the workbench gives."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError, RuntimeError):  # TorchScript, C++ or odd callables
        return
    kinds = {p.kind for p in parameters}
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    name = type(model).__name__
    if not positional and inspect.Parameter.VAR_POSITIONAL not in kinds:
        raise WorkbenchError(f"{name}.forward takes no input; the workbench calls model(inputs) with one tensor per batch")
    required = [p.name for p in positional[1:] if p.default is p.empty]
    required += [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if required:
        raise WorkbenchError(
            f"{name}.forward needs {', '.join(map(repr, required))} besides the input, which the data does not give "
            "(the workbench calls model(inputs) with one tensor per batch); wrap the model in an nn.Module "
            "whose forward takes that one tensor and supplies the rest")


def _probe(model: nn.Module, inputs: torch.Tensor, what: str) -> Any:
    """The model's raw output on the first sample of ``inputs`` (eval mode, modes restored);
    a failure is a `WorkbenchError` with the data's shape."""
    if len(inputs) == 0:
        raise WorkbenchError(f"{what} holds no samples")
    try:
        with torch.no_grad(), evaluation_mode(model):
            return model(to_device(inputs[:1], model_device(model)))
    except Exception as exc:  # the user's model decides what fails; report it with the shape
        raise WorkbenchError(f"{what} of shape {tuple(inputs.shape)} ({inputs.dtype}) does not fit the model: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from None


# ---- metrics -----------------------------------------------------------------------------------

def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """``exp`` of the mean next-token cross-entropy (nats): ``logits (n, T, V)`` at position ``t``
    score ``ids (n, T)`` at ``t + 1``; the last position predicts nothing. Lower is better: 1 is a
    perfect prediction, ``V`` a uniform guess. Ids equal to -100 (padding) are not scored."""
    if logits.dim() != 3 or tuple(ids.shape) != tuple(logits.shape[:2]) or ids.shape[1] < 2:
        raise WorkbenchError(f"perplexity needs logits (n, T, V) and token ids (n, T) with T >= 2; "
                             f"got logits {tuple(logits.shape)} and ids {tuple(ids.shape)}")
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1).long())
    return float(torch.exp(loss.double()))


def _from_transformers(model: nn.Module) -> bool:
    return any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)


def is_causal_lm(model: nn.Module) -> bool:
    """A ``transformers`` model that predicts the next token: a ``*ForCausalLM`` or ``*LMHeadModel``
    class, or a config with ``is_decoder``. Recognised by name; transformers is not imported."""
    if not _from_transformers(model):
        return False
    return (type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
            or bool(getattr(getattr(model, "config", None), "is_decoder", False)))


def scores_next_tokens(model: nn.Module, inputs: torch.Tensor, judged: torch.Tensor) -> bool:
    """Whether the default metric is perplexity: a causal LM given integer token ids ``(n, T)``
    whose judged output is logits ``(n, T, vocab)``."""
    if not is_causal_lm(model) or inputs.dim() != 2 or inputs.dtype.is_floating_point \
            or inputs.dtype.is_complex or inputs.dtype == torch.bool:
        return False
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return (judged.dim() == 3 and tuple(judged.shape[1:2]) == tuple(inputs.shape[1:2])
            and (not isinstance(vocab, int) or judged.shape[-1] == vocab))


# ---- what can be compressed ------------------------------------------------------------------

def skipped_layers(model: nn.Module) -> list[dict]:
    """Modules holding weights that the matrix methods leave alone: ``[{name, type, reason}]``, the
    rows of `workbench.inventory.inventory` with a reason (a GRU/LSTM that ``svd_rnn`` cannot take
    either says why)."""
    rows, modules = [], dict(model.named_modules())
    for entry in inventory(model):
        if entry.reason is None:
            continue
        reason = entry.reason
        module = modules["" if entry.name == "(model)" else entry.name]
        if isinstance(module, (nn.GRU, nn.LSTM)) and unsupported_reason(module):
            reason = f"{entry.type} with {unsupported_reason(module)}: left dense"
        rows.append({"name": entry.name, "type": entry.type, "reason": reason})
    return rows


def load_user(source: Any, *, constructor: Callable[[], nn.Module] | str | None = None,
              eval_data: Any = None, train_data: Any = None, calibration_data: Any = None,
              metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
              metric_name: str | None = None, higher_is_better: bool | None = None,
              output: OutputChoice = None, name: str | None = None,
              texts: Any = None, tokenizer: Any = None,
              known: list[str] | None = None) -> Task:
    """A `Task` for the user's model (``source``: nn.Module or path) and data.

    Parameters
    ----------
    source : an ``nn.Module`` (kept as it is, its train/eval mode included), a file path, or a
        local Hugging Face model folder (``config.json`` and safetensors weights).
    constructor : for state_dict / safetensors files: the callable building the model.
    eval_data : required (unless ``texts``); a DataLoader, a tensor ``x`` or ``(x, y)``. The original is evaluated
        once here (a NaN or infinite metric is refused).
    train_data : same forms; fills ``task.train_inputs`` / ``train_targets`` for fine-tuning,
        distillation, QAT, sensitivity and allocation. Its targets follow the metric: your labels
        with your ``metric``; the token ids for a language model's perplexity; otherwise the
        original's outputs on ``train_data`` (fidelity: the loss is then the distance to them).
    calibration_data : same forms; the inputs of data-aware methods (``task.calibration``). By
        default the training inputs, else the evaluation inputs.
    metric : ``metric(outputs, targets) -> float`` (needs targets in ``eval_data``, except for a
        causal LM, whose targets are its token ids). Without one: perplexity for a causal
        ``transformers`` LM given token ids (lower is better), else output fidelity (mean cosine
        of each sample's output to the original's).
    metric_name : what ``metric`` measures (default: its ``__name__``).
    higher_is_better : for ``metric`` only (default True); the defaults know their direction.
    output : which tensor of the model's output is judged (`workbench.zoo.outputs.select_output`):
        None for the natural one (``logits``, ``last_hidden_state``, the first tensor), a key, an
        index, or a callable.
    name : the task's label (default: the file's stem or the module's class name).
    texts : instead of ``eval_data`` for a language model: a list of strings or a ``.txt`` file
        (one text per line). Each is tokenized on its own (truncated to the model's maximum
        positions) and padded to the longest: the inputs are ids and attention mask ``(n, 2, T)``
        and ``task.model`` is a copy of the model that takes them (`workbench.zoo.hf`). A causal
        LM is judged by perplexity on the real tokens. ``task.extras["text_tokens"]`` is ``T``,
        ``task.extras["real_tokens"]`` the tokens that are not padding.
    tokenizer : for ``texts``: a ``transformers`` tokenizer or a local tokenizer folder (default:
        the model folder's own). One with more tokens than the model's ``vocab_size`` is refused.

    ``task.extras["skipped"]`` lists the layers left alone and why. Bad input (a forward needing
    more arguments, data that does not fit, an absent ``output`` key, an unknown option) is a
    one-line `WorkbenchError`, and the model is left as it was.
    """
    if isinstance(source, str) and not Path(source).exists():
        listing = ", ".join(known or [])
        raise WorkbenchError(f"unknown model {source!r}; embedded models are: {listing}; "
                             "or give an nn.Module, the path of a model file or a local Hugging Face folder")
    if not isinstance(source, (nn.Module, str, Path)):
        raise WorkbenchError(f"load() takes an embedded model name, an nn.Module or a path; "
                             f"got {type(source).__name__}")
    if metric is not None and not callable(metric):
        raise WorkbenchError(f"metric must be callable as metric(outputs, targets) -> float; got {type(metric).__name__}")
    if higher_is_better is not None and (metric is None or not isinstance(higher_is_better, bool)):
        raise WorkbenchError(f"higher_is_better={higher_is_better!r} must be True or False and goes with your "
                             "metric=; the default metrics know their direction")
    if tokenizer is not None and texts is None:
        raise WorkbenchError("tokenizer= goes with texts=; give the texts to tokenize")
    if texts is not None and eval_data is not None:
        raise WorkbenchError("give eval_data or texts, not both (texts become the evaluation token ids)")
    model = load_model(source, constructor)
    if not isinstance(source, nn.Module):
        model.eval()  # built here from a file: ours, not the user's object
    if texts is not None:
        folder = Path(source) if not isinstance(source, nn.Module) and Path(source).is_dir() else None
        eval_data = text_inputs(texts, tokenizer, model, folder)
        model = with_attention_mask(model)  # a copy: the user's model is not touched
    if eval_data is None:
        raise WorkbenchError("give eval_data (a DataLoader, a tensor, or (inputs, targets)), or texts= for a "
                             "language model, so the workbench can measure what compression does to your model")
    inputs, targets = data_tensors(eval_data, "eval_data")
    train_inputs, train_labels = data_tensors(train_data, "train_data") if train_data is not None else (None, None)
    calibration = data_tensors(calibration_data, "calibration_data")[0] if calibration_data is not None else None
    check_forward_arguments(model)
    judged = select_output(_probe(model, inputs, "eval_data"), output)
    for what, extra in (("train_data", train_inputs), ("calibration_data", calibration)):
        if extra is not None:
            _probe(model, extra, what)
    label = name or (Path(source).stem if not isinstance(source, nn.Module) else type(source).__name__)
    task = Task(name=label, model=model, eval_inputs=inputs, eval_targets=torch.empty(0),
                metric=output_fidelity, metric_name=FIDELITY_NAME, train_inputs=train_inputs,
                description=f"user model {label}", extras={"skipped": skipped_layers(model)},
                output=output, calibration=calibration)
    if texts is not None:
        task.extras.update(text_tokens=int(inputs.shape[-1]), real_tokens=int(inputs[:, 1].sum()))
    ids = inputs[:, 0] if texts is not None else inputs
    language_model = scores_next_tokens(model, ids, judged)
    own_ids = next_token_targets(inputs) if texts is not None else inputs  # a language model's targets
    if metric is not None:
        if targets is None and not language_model:
            raise WorkbenchError(f"metric={getattr(metric, '__name__', 'metric')} needs targets: give "
                                 "eval_data=(inputs, targets) or a DataLoader of (inputs, targets) batches, "
                                 "or leave metric out for output fidelity")
        task.metric, task.metric_name = metric, metric_name or getattr(metric, "__name__", "metric")
        task.higher_is_better = True if higher_is_better is None else higher_is_better
        task.eval_targets = own_ids if targets is None else targets
        task.train_targets = train_inputs if train_labels is None and language_model else train_labels
    elif language_model:
        task.metric, task.metric_name, task.higher_is_better = perplexity, PERPLEXITY_NAME, False
        task.eval_targets, task.train_targets = own_ids, train_inputs
    # recovery trains such a model on next-token prediction of its own token ids
    task.extras["causal_lm"] = language_model and task.eval_targets is own_ids
    reference = task.outputs()
    if task.metric is output_fidelity:
        task.eval_targets = reference
        if train_inputs is not None:
            task.train_targets = task.outputs(inputs=train_inputs)
    check_finite(task.metric(reference, task.eval_targets), task.metric_name, "for the original model")
    task.metric = CheckedMetric(task.metric, task.metric_name)  # every later caller: finite or refused
    return task


#: keyword options ``workbench.load`` accepts for the user's models
LOAD_OPTIONS = tuple(name for name, p in inspect.signature(load_user).parameters.items()
                     if p.kind is p.KEYWORD_ONLY and name != "known")
