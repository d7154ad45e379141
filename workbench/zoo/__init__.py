"""Embedded models: ``load(name) -> Task`` (model, evaluation data, metric).

The digits models are trained deterministically on first use and cached on disk.
"""
from __future__ import annotations

from typing import Callable

from workbench.errors import WorkbenchError
from workbench.zoo.task import Task
from workbench.zoo.user import LOAD_OPTIONS, load_user
from workbench.zoo.digits import DIGITS_MODELS, build_digits_task
from workbench.zoo.text import DESCRIPTION as TEXT_DESCRIPTION, build_text_task
from workbench.zoo.minilm import DESCRIPTION as MINILM_DESCRIPTION, build_minilm_task

_BUILDERS: dict[str, tuple[Callable[..., Task], str, tuple[str, ...]]] = {}


def register_model(name: str, builder: Callable[..., Task], description: str, options: tuple[str, ...] = ()) -> None:
    """Make ``load(name, **kw)`` call ``builder(**kw)``; ``options``: the keywords ``builder`` takes."""
    _BUILDERS[name] = (builder, description, tuple(options))


def available_models() -> dict[str, str]:
    """``{name: one-line description}`` of every embedded model."""
    return {name: description for name, (_, description, _) in _BUILDERS.items()}


def model_options(name: str) -> tuple[str, ...]:
    """The keyword options an embedded model's ``load`` takes (``minilm``: ``calibration``)."""
    return _BUILDERS[name][2]


def load(source, /, **options) -> Task:
    """A `Task`: an embedded model by name, or the user's own (an ``nn.Module`` or a path).

    ``source`` is positional only, so ``name=`` labels a user model's task.

    Embedded models take the options they registered (`model_options`): ``load("minilm",
    calibration="extended")`` calibrates on more topics (`workbench.zoo.minilm.calibration_topics`).
    For the user's models (a module, a model file or a local Hugging Face folder), ``options`` are
    those of `workbench.zoo.user.load_user` (``eval_data``, ``train_data``, ``calibration_data``,
    ``metric``, ``output``, ``texts``, ``tokenizer``, ...; see ``LOAD_OPTIONS``). Raises `WorkbenchError` naming
    the known models when a name is neither embedded nor an existing file or folder, and the
    accepted options when one is unknown.
    """
    if isinstance(source, str) and source in _BUILDERS:
        builder, _, accepted = _BUILDERS[source]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            takes = f"takes only {', '.join(accepted)}" if accepted else "takes none"
            raise WorkbenchError(f"options {unknown} are for your own models; the embedded model {source!r} {takes}")
        return builder(**options)
    unknown = sorted(set(options) - set(LOAD_OPTIONS))
    if unknown:
        raise WorkbenchError(f"unknown option(s) {', '.join(unknown)} for load(); accepted: {', '.join(LOAD_OPTIONS)}")
    return load_user(source, known=sorted(_BUILDERS), **options)


def _register_embedded() -> None:
    for model_name, (_, _, description) in DIGITS_MODELS.items():
        register_model(model_name, lambda n=model_name: build_digits_task(n), description)
    register_model("text-gru", build_text_task, TEXT_DESCRIPTION)
    register_model("minilm", build_minilm_task, MINILM_DESCRIPTION, options=("calibration",))


_register_embedded()

__all__ = ["Task", "available_models", "load", "model_options", "register_model"]
