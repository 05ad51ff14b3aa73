"""The Dask task runner of every flow: prefect-dask's, plus GPU placement.

A task whose parameters ask for a CUDA device (a ``device`` argument, or a config argument with a
``device`` field, e.g. ``GenerateConfig(device="cuda")``) is submitted with the Dask resource
annotation ``GPU: 1``: the scheduler then runs it only on workers that declare a GPU (``dask
worker ... --resources GPU=1``), one such task per GPU at a time. Flows need no Dask-specific
code for this; their task signatures already say which device they use.

Imported only when a flow runs on Dask (prefect-dask and distributed are slow to import).
"""

from __future__ import annotations

from typing import Any

import dask
from prefect_dask import DaskTaskRunner

from foresight.flows.runtime import GPU_RESOURCE


def wants_gpu(parameters: dict[str, Any]) -> bool:
    """Whether a task's parameters name a CUDA device, directly or through a config's field."""
    for name, value in parameters.items():
        device = value if name == "device" else getattr(value, "device", None)
        if isinstance(device, str) and device.startswith("cuda"):
            return True
    return False


def check_gpu_workers(client: Any) -> None:
    """Fail with a clear message when a cluster has no worker declaring a GPU resource."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if not any(info.get("resources", {}).get(GPU_RESOURCE, 0) >= 1 for info in workers.values()):
        raise ValueError(
            f"dask cluster at {client.scheduler.address}: no worker declares a '{GPU_RESOURCE}' resource, so "
            f"GPU tasks would wait forever; start one worker per GPU with `dask worker ADDRESS --nthreads 1 "
            f"--resources {GPU_RESOURCE}=1`, or run with --device cpu")


class GPUAwareDaskTaskRunner(DaskTaskRunner):
    """prefect-dask's runner; tasks that ask for a CUDA device request one ``GPU`` resource."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._gpus_checked = False

    def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None, dependencies: Any = None) -> Any:
        if not wants_gpu(parameters):
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
        if not self._gpus_checked:
            check_gpu_workers(self.client)
            self._gpus_checked = True
        with dask.annotate(resources={GPU_RESOURCE: 1}):
            return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)
