"""Sweeps give the serial result on threads, local processes and a 2-worker Dask LocalCluster."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from workbench.errors import WorkbenchError
from workbench.select import _sensitivity as sens
from workbench.select.sweeps import map_items


def square(x):
    return x * x


def test_map_items_keeps_order_on_every_executor():
    items = list(range(7))
    expected = [x * x for x in items]
    assert map_items(square, items, progress=False) == expected
    with ThreadPoolExecutor(2) as pool:
        assert map_items(square, items, executor=pool, progress=False) == expected
    assert map_items(square, items, executor="processes", progress=False) == expected


def test_bad_executor():
    with pytest.raises(WorkbenchError, match="executor=42"):
        map_items(square, [1], executor=42, progress=False)


def test_dask_local_cluster_equals_serial(mlp_task):
    distributed = pytest.importorskip("distributed")
    grid, layers = (0.1, 0.5), ["fc1", "fc3"]
    sens.clear_cache()
    serial = sens.sensitivity(mlp_task, "svd", grid, layers=layers, progress=False)
    sens.clear_cache()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        remote = sens.sensitivity(mlp_task, "svd", grid, layers=layers, executor=client, progress=False)
        assert len(client.scheduler_info()["workers"]) == 2
    sens.clear_cache()
    assert remote.to_dict() == serial.to_dict()


@pytest.mark.timeout(240)
def test_search_on_local_processes_equals_serial_after_torch_has_run_threads():
    """Workers are spawned: forking after torch's OpenMP pool has started can hang the children."""
    import torch

    from workbench.select._search import search

    torch.randn(512, 512) @ torch.randn(512, 512)  # start the intra-op thread pool in this process
    options = dict(population=2, generations=1, epochs=2, progress=False)
    serial = search("mlp", 25_000, **options)
    parallel = search("mlp", 25_000, executor="processes", **options)
    assert [(r["label"], r["test"]) for r in parallel] == [(r["label"], r["test"]) for r in serial]
