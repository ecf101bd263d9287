"""The stage contract in one place: verify parents, write atomically, seal with a manifest, track.

Every stage body is a function `(ctx) -> metrics` that writes into `ctx.out`; `execute` does the rest, so
DVC (`python -m stages.X`), the Prefect flow and the CLI all go through the same path.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.common.artifacts import (
    Manifest,
    atomic_output_dir,
    clean_stale_temps,
    manifest_digest,
    sha256_file,
    verify_artifact,
    write_manifest,
)
from stages.common.errors import PipelineError
from stages.common.params import Params, load_params
from stages.common.preflight import preflight
from stages.common.registry import STAGES
from stages.common.runtime import REPO_ROOT, code_hash, code_version, library_versions, measure, utc_now
from stages.common.tracking import Tracker, set_offline_env

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    stage: str
    params: Params
    out: Path
    artifacts_root: Path
    parents: dict[str, Manifest]
    tracker: Tracker
    device: str = "cpu"
    """Where this stage computes: `runtime.device` resolved for train/evaluate/export, 'cpu' for the others."""
    inputs: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

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


def artifacts_root(params: Params) -> Path:
    root = Path(params.tracking.artifacts_dir)
    return root if root.is_absolute() else REPO_ROOT / root


def metrics_path(params: Params, stage: str) -> Path:
    root = Path(params.tracking.metrics_dir)
    return (root if root.is_absolute() else REPO_ROOT / root) / f"{stage}.json"


def check_lineage(root: Path, parents: dict[str, Manifest]) -> None:
    """Each parent must have been built from the grandparent artifacts now on disk, else it is stale.

    Catches, for example, an adapter trained on a base model that a later `prepare` replaced.
    """
    for name, manifest in parents.items():
        for grand, digest in manifest.parents.items():
            path = root / grand / "manifest.json"
            if path.exists() and manifest_digest(root / grand) != digest:
                raise PipelineError(
                    f"{root / name} was built from a different {grand} artifact than the one now in {root / grand} "
                    f"(stale lineage); re-run `qlora stage {name}` (or `qlora run`)"
                )


def execute(stage: str, params: Params, body: Callable[[StageContext], dict[str, Any]]) -> Manifest:
    """Run one stage end to end; raise PipelineError (one line) on bad input, leave no partial artifact."""
    set_offline_env()
    spec = STAGES[stage]
    device = preflight(params, stage, spec.uses_device)
    root = artifacts_root(params)
    clean_stale_temps(root)
    parents = {p: verify_artifact(root / p, p) for p in spec.parents}
    check_lineage(root, parents)
    tracker = Tracker(params.tracking)
    section_params = {s: params.section(s) for s in spec.params}
    cv = code_version()
    with tracker.run(stage, tags={"stage": stage}) as run_id, atomic_output_dir(root / stage) as tmp:
        ctx = StageContext(stage, params, tmp, root, parents, tracker, device)
        tracker.log_params(section_params)
        with measure(device) as meter:
            metrics = body(ctx)
        manifest = Manifest(
            stage=stage,
            params=section_params,
            code_version=cv,
            inputs=ctx.inputs,
            parents={p: manifest_digest(root / p) for p in spec.parents},
            metrics=metrics,
            timings={"wall_s": round(meter.wall_s, 3)},
            memory=meter.as_memory(),
            device=device,
            libraries=library_versions(),
            created_at=utc_now(),
            extra={"mlflow_run_id": run_id, "code_hash": code_hash(list(spec.code)), **ctx.extra},
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
    return manifest


def _write_metrics_file(path: Path, manifest: Manifest) -> None:
    """DVC metrics live outside the artifact dir (DVC forbids overlapping outputs); written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": manifest.metrics, "timings": manifest.timings, "memory": manifest.memory}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def stage_main(stage: str, run: Callable[[Params], Manifest], argv: list[str] | None = None) -> int:
    """Entry point for `python -m stages.<name> [params.yaml]`: one-line errors, exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    try:
        params = load_params(args[0] if args else REPO_ROOT / "params.yaml")
        manifest = run(params)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"stage": stage, "metrics": manifest.metrics, "memory": manifest.memory}, indent=1))
    return 0
