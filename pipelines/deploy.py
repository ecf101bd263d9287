"""Scheduled retraining: a Prefect deployment of `qlora_pipeline` on a work pool meant for a GPU node.

A team runs `prefect server start` somewhere reachable, `qlora deploy --pool gpu-node-a --cron "0 2 * * 1"`
once, and `prefect worker start --pool gpu-node-a` on the GPU node. Each scheduled run executes the same flow
as `qlora run`; its content-hash cache keys re-run only the stages whose inputs changed.

With `--cpu-pool cpu-pool` the pipeline flow is deployed on the CPU pool and a second deployment, `qlora_stage/
<name>-gpu`, on the GPU pool: the pipeline runs prepare, quantize, merge and release where it is, and hands train,
evaluate and export (the stages that compute on a device) to the GPU pool as flow runs of their own, waiting for each.
Both pools' nodes need this checkout at the same path and the same artifacts folder (a shared filesystem).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.runtime import REPO_ROOT
from qlora_pipeline.stages.contract.tracking import OFFLINE_ENV

ENTRYPOINT = "pipelines/flow.py:qlora_pipeline"
STAGE_ENTRYPOINT = "pipelines/flow.py:qlora_stage"


async def _ensure_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def deploy(
    pool: str = "gpu-node",
    cron: str | None = "0 2 * * 1",
    name: str = "scheduled-retrain",
    params_path: str = "params.yaml",
    stages: list[str] | None = None,
    timezone: str = "UTC",
    env: dict[str, str] | None = None,
    cpu_pool: str | None = None,
) -> Any:
    """Create or update the deployment (and a `process` work pool if missing); returns the deployment id. With
    `cpu_pool`, the pipeline goes to that pool and its device stages to `pool` (module docstring)."""
    from prefect import flow as prefect_flow  # noqa: F401  (ensures prefect settings load before from_source)
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import Flow

    asyncio.run(_ensure_pool(pool))
    remote = Flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)
    params: dict[str, Any] = {"params_path": str(Path(params_path).resolve())}
    if stages:
        params["stages"] = stages
    variables = {
        "working_dir": str(REPO_ROOT),
        "env": {**OFFLINE_ENV, **(env or {})},
    }
    if cpu_pool is not None:
        asyncio.run(_ensure_pool(cpu_pool))
        stage_flow = Flow.from_source(source=str(REPO_ROOT), entrypoint=STAGE_ENTRYPOINT)
        stage_flow.to_deployment(name=f"{name}-gpu", work_pool_name=pool, job_variables=variables).apply(
            work_pool_name=pool
        )
        params["gpu_deployment"] = f"qlora_stage/{name}-gpu"
        pool = cpu_pool
    # to_deployment + apply registers without Flow.deploy's worker listing, which prefect 3.8.8's server rejects
    # (limit=None → 422).
    deployment = remote.to_deployment(
        name=name,
        work_pool_name=pool,
        schedules=[CronSchedule(cron=cron, timezone=timezone)] if cron else None,
        parameters=params,
        job_variables=variables,
    )
    return deployment.apply(work_pool_name=pool)
