"""The tensor a model's forward pass answers with: ``select_output(out, output=None) -> Tensor``.

A model may return a tensor, a tuple or list, a dict, a named tuple, a dataclass, or a
``transformers`` ``ModelOutput`` (an ordered dict whose keys are the fields that are not None,
e.g. ``logits`` and ``cache``). The workbench judges one tensor per batch:

* ``output=None``: the natural output. ``logits`` where there is one (language-model and
  classifier heads), else ``last_hidden_state`` (encoders), else the first tensor found,
  depth first.
* ``output="key"``: that entry of a dict / ``ModelOutput`` / named tuple / dataclass.
  ``output=2``: that element of a tuple or list.
* ``output=callable``: ``output(out) -> Tensor``, for anything else.

A choice the output cannot honour is a `WorkbenchError` naming what the model does return.
``transformers`` is never imported: a ``ModelOutput`` is recognised as a ``Mapping``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import torch

from workbench.errors import WorkbenchError

OutputChoice = str | int | Callable[[Any], torch.Tensor] | None

#: keys of the natural output, in order of preference
NATURAL_KEYS = ("logits", "last_hidden_state")


def _entries(out: Any) -> Iterator[tuple[str | int, Any]] | None:
    """``(key, value)`` pairs of a container output; None for anything that is not one."""
    if isinstance(out, Mapping):
        return iter(out.items())
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a named tuple
        return iter(zip(out._fields, out))
    if isinstance(out, (tuple, list)):
        return iter(enumerate(out))
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return iter((f.name, getattr(out, f.name)) for f in dataclasses.fields(out))
    return None


def _keys(out: Any) -> list[str | int]:
    entries = _entries(out)
    return [] if entries is None else [key for key, _ in entries]


def describe_output(out: Any) -> str:
    """What ``out`` is, for messages: ``"a tensor (4, 16, 100)"``, ``"CausalLMOutputWithPast with
    keys 'logits', 'cache'"``, ``"a tuple of 2"``."""
    if isinstance(out, torch.Tensor):
        return f"a tensor {tuple(out.shape)}"
    kind = type(out).__name__
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return f"a {kind} of {len(out)}"
    if _entries(out) is not None:
        keys = ", ".join(repr(k) for k in _keys(out)) or "none"
        return f"{kind} with keys {keys}"
    return f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    for _, value in _entries(out) or ():
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def natural_key(out: Any) -> str | None:
    """The key `select_output` picks by default (``"logits"``, ``"last_hidden_state"``), or None
    when the output is a tensor or the natural one is merely the first tensor found."""
    keys = [key for key in _keys(out) if isinstance(key, str)]
    entries = dict(_entries(out) or ())
    return next((key for key in NATURAL_KEYS if key in keys and isinstance(entries[key], torch.Tensor)), None)


def natural_output(out: Any) -> torch.Tensor:
    """``logits``, else ``last_hidden_state``, else the first tensor of ``out`` (depth first)."""
    if isinstance(out, torch.Tensor):
        return out
    key = natural_key(out)
    if key is not None:
        return out[key] if isinstance(out, Mapping) else getattr(out, key)
    found = _first_tensor(out)
    if found is None:
        raise WorkbenchError(f"the model returned {describe_output(out)}, which holds no tensor; "
                             "say what to judge with output=a callable returning a tensor")
    return found


def select_output(out: Any, output: OutputChoice = None) -> torch.Tensor:
    """The tensor of ``out`` that the workbench judges (see the module docstring).

    Parameters
    ----------
    out : what the model's forward returned for one batch.
    output : None (the natural output), a key, an index, or ``callable(out) -> Tensor``.

    Raises `WorkbenchError` when ``output`` names a key or index ``out`` does not have (the
    message lists those it has), or when the choice is not a tensor.
    """
    if output is None:
        return natural_output(out)
    if callable(output):
        chosen = output(out)
        if not isinstance(chosen, torch.Tensor):
            name = getattr(output, "__name__", type(output).__name__)
            raise WorkbenchError(f"output={name} returned {describe_output(chosen)}, not a tensor")
        return chosen
    if isinstance(output, bool) or not isinstance(output, (str, int)):
        raise WorkbenchError(f"output={output!r} must be None, a key (str), an index (int) or a callable; "
                             f"got {type(output).__name__}")
    entries = _entries(out)
    if entries is None:
        raise WorkbenchError(f"output={output!r} names an entry, but the model returns {describe_output(out)}, "
                             "which has none; leave output=None")
    found = dict(entries)
    if output not in found:
        kind = "key" if isinstance(output, str) else "index"
        raise WorkbenchError(f"output={output!r}: the model returns no such {kind}; it returns {describe_output(out)}")
    chosen = found[output]
    if not isinstance(chosen, torch.Tensor):
        raise WorkbenchError(f"output={output!r} is {describe_output(chosen)}, not a tensor; "
                             "use output=a callable to pick a tensor inside it")
    return chosen
