"""Typed results: dicts whose declared keys read as attributes, JSON-serialisable as they are.

``wb.measure(model, task).metric`` and ``wb.measure(model, task)["metric"]`` are the same value;
``json.dumps(result)`` writes it. Each result type declares its keys with their units.
"""
from __future__ import annotations


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
