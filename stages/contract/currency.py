"""Is a stage's artifact current? The one rule the flow, the CLI (`qlora status`) and `execute` share.

An artifact is current when it verifies against its manifest and was made from the params the stage declares,
the code it reaches (`StageSpec.code()`), the external inputs it reads (prepare: the dataset bytes) and the parent
artifacts now on disk. DVC applies the same rule from the same spec: dvc.yaml lists exactly those code files,
params fields and parent folders (`pipelines/dvcgen.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qlora_pipeline.stages.contract.artifacts import (
    Manifest,
    manifest_digest,
    verify_artifact,
)
from qlora_pipeline.stages.contract.codedeps import code_hash
from qlora_pipeline.stages.contract.errors import PipelineError
from qlora_pipeline.stages.contract.params import Params
from qlora_pipeline.stages.contract.registry import load_stage
from qlora_pipeline.stages.contract.runtime import REPO_ROOT


def artifacts_root(params: Params) -> Path:
    root = Path(params.tracking.artifacts_dir)
    return root if root.is_absolute() else REPO_ROOT / root


@dataclass(frozen=True)
class Currency:
    current: bool
    reason: str = ""
    """Why the artifact is stale ('' when current)."""


def stale_parent(root: Path, manifest: Manifest, missing_is_stale: bool = True) -> str | None:
    """The first parent whose artifact on disk is not the one this manifest was built from, else None."""
    for parent, digest in manifest.parents.items():
        if not (root / parent / "manifest.json").exists():
            if missing_is_stale:
                return parent
        elif manifest_digest(root / parent) != digest:
            return parent
    return None


def check_lineage(root: Path, parents: dict[str, Manifest]) -> None:
    """Each parent must have been built from the grandparent artifacts now on disk, else it is stale.

    Catches, for example, an adapter trained on a base model that a later `prepare` replaced.
    """
    for name, manifest in parents.items():
        grand = stale_parent(root, manifest, missing_is_stale=False)
        if grand is not None:
            raise PipelineError(
                f"{root / name} was built from a different {grand} artifact than the one now in {root / grand} "
                f"(stale lineage); re-run `qlora stage {name}` (or `qlora run`)"
            )


def currency(stage: str, params: Params) -> Currency:
    """Whether `stage`'s artifact on disk is current for these params, this code and these inputs."""
    root = artifacts_root(params)
    try:
        manifest = verify_artifact(root / stage, stage)
    except PipelineError as exc:
        return Currency(False, str(exc))
    loaded = load_stage(stage)
    if manifest.params != loaded.spec.param_values(params):
        return Currency(False, "params changed")
    if any(manifest.inputs.get(k) != v for k, v in loaded.external_inputs(params).items()):
        return Currency(False, "input data changed")
    parent = stale_parent(root, manifest)
    if parent is not None:
        return Currency(False, f"built from another {parent} artifact than the one on disk")
    if manifest.code_hash != code_hash(loaded.spec.code()):
        return Currency(False, "code changed")
    return Currency(True)
