"""Prefect deployments of the pipeline flow: for a work pool (``foresight deploy``) and served
from one process (``foresight serve``).

A deployment stores the pipeline config as its ``config`` parameter, so the Prefect UI shows and
edits it field by field (the config is a pydantic model), and the entrypoint of the checkout, so
a process worker started in it imports the same code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POOL_TYPE = "process"


def ensure_work_pool(name: str) -> None:
    """Create the process work pool ``name`` on the server unless it exists."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE))
                log.info("created work pool %s (%s)", name, POOL_TYPE)
            except ObjectAlreadyExists:
                pass  # another process created it between our read and create: same pool
            return
        if pool.type != POOL_TYPE:
            log.warning("work pool %s is of type %s; its workers must be able to run this checkout", name, pool.type)


def deploy_pipeline(repo: Path, entrypoint: str, name: str, pool: str, parameters: dict[str, Any],
                    cron: str | None = None, interval: int | None = None) -> str:
    """Register the pipeline flow of the checkout ``repo`` as deployment ``name`` on ``pool``;
    returns the deployment id."""
    from prefect import flow

    ensure_work_pool(pool)
    source = flow.from_source(source=str(repo), entrypoint=entrypoint)
    deployment_id = source.deploy(name=name, work_pool_name=pool, parameters=parameters, cron=cron,
                                  interval=interval, build=False, push=False, print_next_steps=False,
                                  ignore_warnings=True, job_variables={"working_dir": str(repo)})
    return str(deployment_id)

