"""Coalescing of slider events: while one computation runs, only the latest requested value is kept.

A slider sends a value on every step; computing each one in turn makes the display lag behind the
hand and, worse, end on a stale value. `Coalescer.submit(value)` records the value and returns at
once; a single worker thread computes ``compute(value)`` then ``render(result)``, and when it
finishes it takes the *latest* value submitted meanwhile (skipping the ones in between). The last
value computed is therefore always the last value submitted: the display ends on what the slider
shows. An exception in ``compute`` or ``render`` becomes ``on_error(message)`` (a line of text,
never a traceback) and the worker goes on with the next value.

``synchronous=True`` runs everything in the caller (tests, scripts, the CLI benchmark); ``run(value)``
does one value in the caller whatever the mode (an explorer's first display, before any worker).
"""
from __future__ import annotations

import threading
from typing import Any, Callable

from workbench.errors import WorkbenchError

_NOTHING = object()


def error_message(exc: BaseException) -> str:
    """One line for the user: the message of a `WorkbenchError`, else the type and message."""
    if isinstance(exc, WorkbenchError):
        return str(exc)
    return f"internal error ({type(exc).__name__}): {exc}"


class Coalescer:
    """Run ``render(compute(value))`` for the latest submitted value, one at a time.

    Parameters
    ----------
    compute : ``value -> result``; may be slow; runs on the worker thread.
    render : ``result -> None``; updates widgets/artists; runs right after ``compute``.
    on_error : ``message -> None``; called instead of ``render`` when either raises.
    synchronous : run in the caller's thread instead of a worker.
    """

    def __init__(self, compute: Callable[[Any], Any], render: Callable[[Any], None],
                 on_error: Callable[[str], None], synchronous: bool = False):
        self.compute, self.render, self.on_error = compute, render, on_error
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._pending: Any = _NOTHING
        self._worker: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.computed: list[Any] = []   # values actually computed, in order (for inspection)
        self.last_value: Any = _NOTHING

    def submit(self, value: Any) -> None:
        """Ask for ``value``; replaces any value still waiting (it will never be computed)."""
        if self.synchronous:
            self.run(value)
            return
        with self._lock:
            self._pending = value
            self._idle.clear()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="workbench-coalescer", daemon=True)
                self._worker.start()

    def wait(self, timeout: float | None = 30.0) -> bool:
        """Block until every submitted value is handled; False on timeout."""
        return self._idle.wait(timeout)

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                value, self._pending = self._pending, _NOTHING
                if value is _NOTHING:
                    self._worker = None
                    self._idle.set()
                    return
            self.run(value)

    def run(self, value: Any) -> None:
        """``render(compute(value))`` in the caller's thread, errors to ``on_error``; not while a worker runs."""
        self.computed.append(value)
        self.last_value = value
        try:
            result = self.compute(value)
            self.render(result)
        except Exception as exc:  # noqa: BLE001 - shown to the user as a message, never a traceback
            self.on_error(error_message(exc))
