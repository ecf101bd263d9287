"""The Prefect flow `qlora_pipeline`: one task per stage, each calling the stage's own `run` (`load_stage`).

A stage whose artifact on disk is current (`currency.currency`: intact, built from these declared params, this code,
these inputs and these parents) is reused, not re-run; otherwise it runs. That check is the whole cache: Prefect
persists no task result, so nothing is ever unpickled from a results folder (a planted pickle there runs nothing).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.settings import (
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from qlora_pipeline.stages.contract.artifacts import read_manifest
from qlora_pipeline.stages.contract.currency import artifacts_root, currency
from qlora_pipeline.stages.contract.device import bound_cpu_kernel_caches
from qlora_pipeline.stages.contract.errors import PipelineError
from qlora_pipeline.stages.contract.host_heap import bound_host_heap
from qlora_pipeline.stages.contract.params import Params, load_params
from qlora_pipeline.stages.contract.registry import ORDER, STAGES, load_stage
from qlora_pipeline.stages.contract.runtime import REPO_ROOT
from qlora_pipeline.stages.contract.tracking import Tracker, set_offline_env

log = logging.getLogger(__name__)


def _retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only I/O hiccups; bad input fails the same way every time."""
    try:
        state.result()
    except PipelineError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


def dvc_commit(stage: str) -> None:
    """Record a stage run by the flow in dvc.lock, so DVC lineage matches what Prefect produced."""
    if not (REPO_ROOT / ".dvc").is_dir():
        log.info("not a DVC repository; skipping `dvc commit %s`", stage)
        return
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "dvc", "commit", "--force", stage],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "DVC_NO_ANALYTICS": "1"},
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:  # lineage bookkeeping must not fail a finished stage
        log.warning("dvc commit %s failed: %s", stage, exc)
        return
    if proc.returncode != 0:
        log.warning("dvc commit %s failed: %s", stage, proc.stderr.strip()[-500:])


@task(
    name="stage",
    task_run_name="{stage}",
    persist_result=False,
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_transient,
)
def run_stage(
    stage: str, params: dict[str, Any], force: bool = False, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Run the stage and return its manifest (a small dict; tensors never pass through Prefect).

    An artifact already current on disk (say, made by `dvc repro`) is reused rather than rebuilt; the flow
    passes force=True when it has already found the artifact stale, so it is not hashed twice.
    """
    p = Params.model_validate(params)
    if not force and currency(stage, p).current:
        log.info("%s is up to date on disk; reusing it", stage)
        return json.loads(read_manifest(artifacts_root(p) / stage, stage).to_json())
    manifest = load_stage(stage).run(p, parent_run_id=parent_run_id)
    if p.tracking.dvc_commit:
        dvc_commit(stage)
    return json.loads(manifest.to_json())


@flow(name="qlora_stage")
def qlora_stage(
    stage: str, params_path: str = "params.yaml", force: bool = False, parent_run_id: str | None = None
) -> dict[str, Any]:
    """One stage, as a flow of its own: what a GPU node's work pool runs for a pipeline routed from a CPU pool."""
    set_offline_env()
    return run_stage(stage, load_params(params_path).model_dump(mode="json"), force=force, parent_run_id=parent_run_id)


def run_on_gpu_pool(
    deployment: str, stage: str, params: Params, params_path: str, force: bool, parent_run_id: str | None
) -> dict[str, Any]:
    """Run `stage` as a `qlora_stage` flow run of `deployment` (a GPU node's pool), wait for it, and return the
    manifest it wrote to the shared artifacts folder."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        name=deployment,
        parameters={"stage": stage, "params_path": params_path, "force": force, "parent_run_id": parent_run_id},
        timeout=None,
    )
    if run.state is None or not run.state.is_completed():
        message = run.state.message if run.state is not None else "no state"
        raise PipelineError(f"{stage} failed on {deployment} (flow run {run.id}): {message}")
    return json.loads(read_manifest(artifacts_root(params) / stage, stage).to_json())


@flow(name="qlora_pipeline")
def qlora_pipeline(
    params_path: str = "params.yaml",
    stages: list[str] | None = None,
    force: bool = False,
    gpu_deployment: str | None = None,
) -> dict[str, dict[str, Any]]:
    """All stages in order; `stages` limits the run (parents must then already exist). With `gpu_deployment`
    (`qlora_stage/<name>` on a GPU node's pool), the stages that compute on a device (train, evaluate, export) run
    there and the rest here; both nodes must see the same artifacts folder (docs/multi_gpu.md)."""
    set_offline_env()
    params = load_params(params_path)
    selected = [s for s in ORDER if not stages or s in stages]
    tracker = Tracker(params.tracking)
    results: dict[str, dict[str, Any]] = {}
    with tracker.run("pipeline", tags={"stages": ",".join(selected)}) as run_id:
        for name in selected:
            # A cached key is only trusted while its artifact is still on disk, intact and current.
            state = currency(name, params)
            refresh = force or not state.current
            if not state.current:
                log.info("%s: %s", name, state.reason)
            if gpu_deployment and STAGES[name].uses_device:
                results[name] = (
                    run_on_gpu_pool(gpu_deployment, name, params, params_path, refresh, run_id)
                    if refresh
                    else json.loads(read_manifest(artifacts_root(params) / name, name).to_json())
                )
                continue
            results[name] = run_stage(name, params.model_dump(mode="json"), force=refresh, parent_run_id=run_id)
        tracker.set_tags({f"stage.{k}.created_at": v.get("created_at") for k, v in results.items()})
        # every stage's memory peak and wall time side by side in the pipeline run
        tracker.log_metrics(
            {
                f"{k}.{m}": val
                for k, v in results.items()
                for m, val in {**v.get("memory", {}), **v.get("timings", {})}.items()
            }
        )
    return results


def results_summary(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, float, float]]:
    """(stage, created_at, wall seconds, peak RSS MiB) per stage, for the CLI's table."""
    return [
        (
            name,
            m.get("created_at", ""),
            m.get("timings", {}).get("wall_s", 0.0),
            m.get("memory", {}).get("peak_rss_mb", 0.0),
        )
        for name, m in results.items()
    ]


def run_pipeline(
    params_path: Path | str = "params.yaml", stages: list[str] | None = None, force: bool = False
) -> dict[str, dict[str, Any]]:
    """The flow with our Prefect defaults (the environment wins where it sets them): results next to the artifacts,
    and a patient start of the ephemeral server (slow on a 2-core machine)."""
    bound_cpu_kernel_caches()
    bound_host_heap()
    defaults = {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120}
    settings = {s: v for s, v in defaults.items() if s.name not in os.environ}
    with temporary_settings(updates=settings):
        return qlora_pipeline(params_path=str(params_path), stages=stages, force=force)
