"""The Prefect flow `qlora_pipeline`: one task per stage, each calling the stage's own `run`.

Cache keys are content hashes (params section + code of the stage + parent manifests), so an unchanged
stage is skipped across runs; Prefect's default policy includes the run id and would never reuse. A cached
key is only trusted while the artifact on disk still verifies against its manifest and was made from the
same params and code; otherwise the flow refreshes the cache entry and the stage re-runs.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from stages.common.tracking import set_offline_env

set_offline_env()
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Task results (manifests, never tensors) persist next to the artifacts they describe.
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(Path(__file__).resolve().parents[1] / ".prefect" / "results"))

from prefect import flow, task  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402

from stages.common.artifacts import manifest_digest, read_manifest, sha256_json, verify_artifact  # noqa: E402
from stages.common.errors import PipelineError  # noqa: E402
from stages.common.params import Params, load_params  # noqa: E402
from stages.common.registry import ORDER, STAGES  # noqa: E402
from stages.common.runtime import REPO_ROOT, code_hash  # noqa: E402
from stages.common.stage import artifacts_root  # noqa: E402
from stages.common.tracking import PARENT_RUN_ENV, Tracker  # noqa: E402

log = logging.getLogger(__name__)


def external_inputs(stage: str, params: Params) -> dict[str, str]:
    """What a stage reads from outside the artifact tree (prepare: the dataset bytes), from the stage module's own
    `external_inputs(params)`; {} for stages that read only their parents."""
    fn = getattr(importlib.import_module(f"stages.{stage}"), "external_inputs", None)
    return fn(params) if fn is not None else {}


def _artifact_is_current(stage: str, params: Params) -> bool:
    """The on-disk artifact verifies and was made from these params, this code and these external inputs."""
    root = artifacts_root(params)
    try:
        manifest = verify_artifact(root / stage, stage)
    except PipelineError:
        return False
    spec = STAGES[stage]
    wanted = {s: params.section(s) for s in spec.params}
    if manifest.params != wanted:
        return False
    if any(manifest.inputs.get(k) != v for k, v in external_inputs(stage, params).items()):
        return False  # new data
    for parent, digest in manifest.parents.items():  # built from the parents now on disk?
        if not (root / parent / "manifest.json").exists() or manifest_digest(root / parent) != digest:
            return False
    recorded = manifest.extra.get("code_hash")
    return recorded is None or recorded == code_hash(list(spec.code))


def stage_cache_key(params: Params, stage: str) -> str:
    """Content key: stage, its params section, its code, its external inputs and the manifests of its parents."""
    spec = STAGES[stage]
    root = artifacts_root(params)
    parents = {}
    for p in spec.parents:
        try:
            parents[p] = sha256_json(read_manifest(root / p, p).outputs)
        except PipelineError:
            parents[p] = "missing"
    return sha256_json(
        {
            "stage": stage,
            "params": {s: params.section(s) for s in spec.params},
            "code": code_hash(list(spec.code)),
            "parents": parents,
            "inputs": external_inputs(stage, params),
        }
    )


def _cache_key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    params = Params.model_validate(parameters["params"])
    stage = parameters["stage"]
    return f"{stage}-{stage_cache_key(params, stage)}"


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
    cache_key_fn=_cache_key_fn,
    persist_result=True,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_retry_transient,
)
def run_stage(stage: str, params: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Run `stages.<stage>.run` and return its manifest (a small dict; tensors never pass through Prefect).

    An artifact already current on disk (say, made by `dvc repro`) is reused rather than rebuilt; the flow
    passes force=True when it has already found the artifact stale, so it is not hashed twice.
    """
    p = Params.model_validate(params)
    if not force and _artifact_is_current(stage, p):
        log.info("%s is up to date on disk; reusing it", stage)
        return json.loads(read_manifest(artifacts_root(p) / stage, stage).to_json())
    module = importlib.import_module(f"stages.{stage}")
    manifest = module.run(p)
    if p.tracking.dvc_commit:
        dvc_commit(stage)
    return json.loads(manifest.to_json())


@flow(name="qlora_pipeline")
def qlora_pipeline(
    params_path: str = "params.yaml", stages: list[str] | None = None, force: bool = False
) -> dict[str, dict[str, Any]]:
    """All stages in order; `stages` limits the run (parents must then already exist)."""
    params = load_params(params_path)
    selected = [s for s in ORDER if not stages or s in stages]
    tracker = Tracker(params.tracking)
    results: dict[str, dict[str, Any]] = {}
    with tracker.run("pipeline", tags={"stages": ",".join(selected)}) as run_id:
        if run_id:
            os.environ[PARENT_RUN_ENV] = run_id
        try:
            for name in selected:
                # A cached key is only trusted while its artifact is still on disk, intact and current.
                refresh = force or not _artifact_is_current(name, params)
                stage_task = run_stage.with_options(refresh_cache=refresh)
                results[name] = stage_task(name, params.model_dump(mode="json"), force=refresh)
        finally:
            os.environ.pop(PARENT_RUN_ENV, None)
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
    return qlora_pipeline(params_path=str(params_path), stages=stages, force=force)
