"""Typed results: dicts whose declared keys read as attributes, JSON-serialisable as they are.

``wb.measure(model, task).metric`` and ``wb.measure(model, task)["metric"]`` are the same value;
``json.dumps(result)`` writes it. Each result type declares its keys with their units.
`dumps` writes strict JSON (RFC 8259): a non-finite number becomes ``null`` with a reason beside it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable


class Record(dict):
    """A dict with attribute access to its keys (the class annotations list the declared ones)."""

    __slots__ = ()

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no {name!r}; it has: {', '.join(self)}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


class Measurement(Record):
    """What `workbench.measure` measured of a model on a task."""

    metric: float       # the task's metric (e.g. accuracy) on its evaluation data
    params: int         # parameters, each shared (tied) tensor counted once
    bytes: int          # bytes of the state dict really written to a file
    flops: int          # FLOPs of one sample's forward pass (torch.utils.flop_counter)
    latency_ms: float   # median CPU time of one sample's forward pass (when measured)
    threads: int        # torch threads the latency was measured with


class Evaluation(Record):
    """What `workbench.engine.Engine.evaluate` computed for a plan."""

    metric: float       # the task's metric, as task.evaluate(apply(model, plan)) gives it
    params: int         # parameters of the compressed model
    bytes: int          # state-dict tensor payload (see bytes_method); bytes_file: a written file
    bytes_method: str   # how bytes was counted
    flops: int          # FLOPs of one sample's forward pass
    from_stage: int     # first stage re-run (0: full evaluation)
    stages_run: int     # stages run for this plan
    full: bool          # whether the whole model ran
    compute_ms: float   # wall time of the evaluation


class Preview(Record):
    """What `workbench.engine.Engine.preview` estimated for one layer at one rank, without a forward pass."""

    layer: str
    rank: int
    weight_error: float         # ||W - W_r||_F / ||W||_F
    output_error: float | None  # ||X (W - W_r)^T||_F / ||X W^T||_F on the cached inputs X


ERROR_SUFFIX = "_error"


def _reason(value: float) -> str:
    return f"not a finite number ({value!r}): no value could be computed"


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (dicts, lists, tuples walked), and a
    ``KEY_error`` reason added beside each dict key whose value was replaced (an existing one kept).
    numpy / torch scalars become Python numbers; a `Path` becomes its string."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out: dict = {}
        for key, item in value.items():
            clean = finite(item)
            if clean is None and key in out:
                continue  # a ``KEY_error`` of None after a reason was put there for KEY
            out[key] = clean
            if clean is None and isinstance(item, float) and isinstance(key, str):
                error_key = f"{key}{ERROR_SUFFIX}"
                if value.get(error_key) is None:  # the producer's own reason wins
                    out[error_key] = _reason(item)
        return out
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return finite(item())
    return value


def dumps(result: Any, indent: int | None = None, default: Callable[[Any], Any] | None = None) -> str:
    """Strict JSON text of ``result`` (see `finite`); raises ValueError if a NaN slipped through
    (e.g. from ``default``), so a non-standard file is never written."""
    return json.dumps(finite(result), indent=indent, allow_nan=False, default=default)
