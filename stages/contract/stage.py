"""The stage contract in one place: verify parents, write atomically, seal with a manifest, track.

Every stage body is a function `(ctx) -> metrics` that writes into `ctx.out`; `execute` does the rest, so DVC
(`qlora stage NAME`), the Prefect flow and the CLI all go through the same path (`registry.load_stage`).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from qlora_pipeline.kernels.formats.atomic import atomic_dir, atomic_file
from qlora_pipeline.stages.contract.artifacts import (
    Manifest,
    clean_stale_temps,
    manifest_digest,
    read_manifest,
    sha256_file,
    verify_artifact,
    write_manifest,
)
from qlora_pipeline.stages.contract.codedeps import code_hash
from qlora_pipeline.stages.contract.currency import artifacts_root, check_lineage
from qlora_pipeline.stages.contract.errors import InputError, PipelineError
from qlora_pipeline.stages.contract.params import DeclaredParams, Params
from qlora_pipeline.stages.contract.preflight import preflight
from qlora_pipeline.stages.contract.registry import STAGES
from qlora_pipeline.stages.contract.run_lock import run_lock
from qlora_pipeline.stages.contract.runtime import (
    REPO_ROOT,
    code_version,
    library_versions,
    measure,
    utc_now,
)
from qlora_pipeline.stages.contract.tracking import Tracker, set_offline_env

log = logging.getLogger(__name__)


@dataclass
class StageRecord:
    """Facts a stage states about its own run beyond its metrics; each stage subclasses it with typed fields.

    Stored as `manifest.record`; read back with `TheRecord.of(manifest)`.
    """

    @classmethod
    def of(cls, manifest: Manifest) -> Self:
        try:
            return cls(**manifest.record)
        except TypeError:  # a manifest an older version wrote
            raise InputError(
                f"the {manifest.stage} artifact lacks what this version records ({cls.__name__}); "
                f"re-run `qlora stage {manifest.stage}`"
            ) from None


@dataclass
class StageContext:
    stage: str
    params: DeclaredParams
    """Only the params fields the stage declares in its StageSpec; reading another one is an error."""
    out: Path
    artifacts_root: Path
    parents: dict[str, Manifest]
    tracker: Tracker
    device: str = "cpu"
    """Where this stage computes: `runtime.device` resolved for train/evaluate/export, 'cpu' for the others."""
    inputs: dict[str, str] = field(default_factory=dict)
    record: StageRecord | None = None
    after_publish: list[Callable[[], None]] = field(default_factory=list)
    """Run once the artifact is in place (train drops its resume checkpoints, release publishes the bundle)."""

    def parent_dir(self, stage: str) -> Path:
        return self.artifacts_root / stage

    def add_input(self, path: Path, label: str | None = None, digest: str | None = None) -> None:
        """Record the sha256 of a file read from outside the artifact tree (dataset bytes, base weights)."""
        path = Path(path)
        try:
            key = label or path.resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:
            key = str(path.resolve())
        self.inputs[key] = digest or sha256_file(path)


def metrics_path(params: Params, stage: str) -> Path:
    root = Path(params.tracking.metrics_dir)
    return (root if root.is_absolute() else REPO_ROOT / root) / f"{stage}.json"


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, raised as an OSError or reported by a native writer (safetensors: "os error 28")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _disk_full_error(stage: str, params: Params, root: Path, exc: BaseException) -> DiskFull:
    from qlora_pipeline.stages.contract.disk import stage_write_bytes

    where = Path(exc.filename) if isinstance(exc, OSError) and exc.filename else root
    free = shutil.disk_usage(root).free / 2**20
    need = stage_write_bytes(params, stage)
    needs = f"; {stage} writes about {need / 2**20:.1f} MiB" if need else ""
    return DiskFull(
        f"disk full while {stage} wrote {where} ({free:.0f} MiB free there{needs}); nothing of this run was kept: "
        "free space or set tracking.artifacts_dir to a larger disk, then run again"
    )


class DiskFull(PipelineError):
    """The disk filled up under a stage; its temporary output is gone, the previous artifact untouched. Not
    transient: retrying fills the same disk again."""


def execute(
    stage: str, params: Params, body: Callable[[StageContext], dict[str, Any]], parent_run_id: str | None = None
) -> Manifest:
    """Run one stage end to end; raise PipelineError (one line) on bad input, leave no partial artifact.

    `parent_run_id`: the MLflow run of the pipeline this stage runs in (the flow passes it), if any.
    """
    set_offline_env()
    spec = STAGES[stage]
    device = preflight(params, stage, spec.uses_device)
    root = artifacts_root(params)
    with run_lock(root, f"qlora stage {stage}"):
        try:
            return _execute_locked(stage, params, body, parent_run_id, spec, device, root)
        except Exception as exc:
            if not _disk_full(exc):
                raise
            raise _disk_full_error(stage, params, root, exc) from None


def _execute_locked(
    stage: str,
    params: Params,
    body: Callable[[StageContext], dict[str, Any]],
    parent_run_id: str | None,
    spec: Any,
    device: str,
    root: Path,
) -> Manifest:
    """`execute` once the artifacts folder is this run's alone."""
    clean_stale_temps(root)
    parents = {p: verify_artifact(root / p, p) for p in spec.parents}
    check_lineage(root, parents)
    tracker = Tracker(params.tracking)
    declared = spec.param_values(params)
    cv = code_version()
    run_ctx = tracker.run(stage, tags={"stage": stage}, parent_run_id=parent_run_id)
    with run_ctx as run_id, atomic_dir(root / stage) as tmp:
        ctx = StageContext(stage, DeclaredParams(params, spec.params, stage), tmp, root, parents, tracker, device)
        tracker.log_params(declared)
        with measure(device) as meter:
            metrics = body(ctx)
        manifest = Manifest(
            stage=stage,
            params=declared,
            code_version=cv,
            inputs=ctx.inputs,
            parents={p: manifest_digest(root / p) for p in spec.parents},
            metrics=metrics,
            timings={"wall_s": round(meter.wall_s, 3)},
            memory=meter.as_memory(),
            device=device,
            libraries=library_versions(),
            created_at=utc_now(),
            code_hash=code_hash(spec.code()),
            mlflow_run_id=run_id,
            record=asdict(ctx.record) if ctx.record is not None else {},
        )
        write_manifest(tmp, manifest)
        tracker.log_metrics(metrics)
        tracker.log_metrics({"wall_s": meter.wall_s, **{f"memory.{k}": v for k, v in manifest.memory.items()}})
        tracker.set_tags(
            {
                "device": device,
                "git_commit": cv.get("commit"),
                "git_dirty": cv.get("dirty"),
                "manifest_outputs": len(manifest.outputs),
                **{f"sha256.{k}"[:250]: v for k, v in list(manifest.outputs.items())[:40]},
            }
        )
    _write_metrics_file(metrics_path(params, stage), manifest)
    for hook in ctx.after_publish:
        hook()
    return manifest


def follow(stage: str, params: Params, body: Callable[[StageContext], dict[str, Any]]) -> None:
    """Run a stage's body on a rank other than 0 of a stage that trains on several processes: the same verified
    inputs and params, its outputs written to a scratch folder and dropped; rank 0's `execute` publishes."""
    import tempfile

    from qlora_pipeline.stages.contract.device import resolve_device

    set_offline_env()
    spec = STAGES[stage]
    device = str(resolve_device(params.runtime.device)) if spec.uses_device else "cpu"
    root = artifacts_root(params)
    parents = {p: read_manifest(root / p, p) for p in spec.parents}  # rank 0 verifies the files' hashes
    with tempfile.TemporaryDirectory(prefix=f"{stage}-rank-") as scratch:
        declared = DeclaredParams(params, spec.params, stage)
        tracker = Tracker(params.tracking.model_copy(update={"mlflow": False}))
        body(StageContext(stage, declared, Path(scratch), root, parents, tracker, device))


def _write_metrics_file(path: Path, manifest: Manifest) -> None:
    """DVC metrics live outside the artifact dir (DVC forbids overlapping outputs); written atomically."""
    payload = {"metrics": manifest.metrics, "timings": manifest.timings, "memory": manifest.memory}
    with atomic_file(path) as tmp:  # a unique temp name, fsynced before the rename
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
