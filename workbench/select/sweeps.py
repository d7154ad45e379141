"""Run a sweep (sensitivity rows, search candidates) on any executor, results in input order.

``executor`` may be:

- ``None`` or ``"serial"``: in this process, one item after another (best for tiny models);
- ``"processes"``: a local ``ProcessPoolExecutor`` (one worker per CPU, at most one per item),
  created and shut down here. Workers are *spawned*, not forked: a fork of a process whose
  OpenMP thread pool torch has already started can hang in the child;
- any ``concurrent.futures.Executor`` (kept open: the caller owns it);
- a ``dask.distributed.Client``: its ``get_executor()`` sends items to the cluster's workers.
  Point a client at a real cluster with ``Client("tcp://scheduler:8786")``; the workers need
  ``compression-workbench`` installed (same versions) since items and the function are pickled.

``fn`` must be a module-level function (picklable) of one argument.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from workbench.errors import WorkbenchError
import torch


def _is_dask_client(obj: Any) -> bool:
    try:
        from distributed import Client  # noqa: PLC0415 (optional heavy dependency, loaded on first use)
    except ImportError:  # pragma: no cover - distributed is a dependency
        return False
    return isinstance(obj, Client)


def map_items(fn: Callable[[Any], Any], items: Iterable[Any], executor: Any = None,
              progress: bool = True, desc: str = "sweep") -> list:
    """``[fn(item) for item in items]`` on ``executor`` (see module docstring), with a tqdm bar.

    Exceptions raised by ``fn`` propagate (the first one, in input order).
    """
    items = list(items)
    bar = tqdm(total=len(items), desc=desc, disable=not progress, leave=False)
    try:
        if executor is None or executor == "serial":
            results = []
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        if executor == "processes":
            workers = max(1, min(len(items), os.cpu_count() or 1))
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_one_thread_per_worker) as pool:
                return _run_on(pool, fn, items, bar)
        if _is_dask_client(executor):
            return _run_on(executor.get_executor(pure=False), fn, items, bar)
        if isinstance(executor, Executor):
            return _run_on(executor, fn, items, bar)
        raise WorkbenchError(
            f"executor={executor!r} must be None, 'serial', 'processes', a concurrent.futures.Executor "
            "or a dask.distributed.Client")
    finally:
        bar.close()


def _one_thread_per_worker() -> None:
    """Each worker computes on one core: the pool already has one worker per core."""

    torch.set_num_threads(1)


def _run_on(executor: Executor, fn: Callable, items: list, bar) -> list:
    futures = [executor.submit(fn, item) for item in items]
    results = []
    for future in futures:
        results.append(future.result())
        bar.update()
    return results
