"""Artifact directories: manifests with sha256 of every file, verification, leftovers of killed writers.

A stage writes into a temporary sibling directory and renames it into place only when complete
(`kernels/formats/atomic.py`, `atomic_dir`), so a crash leaves the previous good artifact or nothing. Each
artifact holds `manifest.json`; a consumer re-hashes the files it reads and refuses any that differ from their
manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def hash_tree(root: Path, exclude: frozenset[str] = frozenset({MANIFEST})) -> dict[str, str]:
    """sha256 of every file below root, keyed by POSIX relative path, sorted."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in exclude:
                out[rel] = sha256_file(p)
    return out


@dataclass
class Manifest:
    """What a stage produced, from what, with which code and params."""

    stage: str
    params: dict[str, Any]
    code_version: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    """sha256 of each input file, keyed by a path relative to the repo root (or an absolute path outside it)."""
    parents: dict[str, str] = field(default_factory=dict)
    """sha256 of each parent artifact's manifest.json, keyed by parent stage name."""
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    """Where the stage computed (`runtime.device` resolved), e.g. 'cuda:0' or 'cpu'."""
    libraries: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    code_hash: str = ""
    """sha256 over the stage's source files (`StageSpec.code()`), for the currency check."""
    mlflow_run_id: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    """The stage's own facts about its run, written from its `StageRecord` dataclass (read back with
    `TheRecord.of(manifest)`)."""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def clean_stale_temps(parent: Path) -> None:
    """Finish the swaps a killed process left half-done (an artifact is never lost between its renames) and remove
    the temp dirs it left behind (`kernels/formats/atomic.py` `recover_swaps`)."""
    from qlora_pipeline.kernels.formats.atomic import recover_swaps

    for line in recover_swaps(parent):
        log.warning("%s (a run was killed while publishing it)", line)


def write_manifest(out_dir: Path, manifest: Manifest) -> Manifest:
    """Hash every file in out_dir into manifest.outputs and write manifest.json (last, so it seals the dir)."""
    manifest.outputs = hash_tree(out_dir)
    (out_dir / MANIFEST).write_text(manifest.to_json())
    return manifest


def read_manifest(artifact_dir: Path, stage: str) -> Manifest:
    path = Path(artifact_dir) / MANIFEST
    if not path.exists():
        raise InputError(
            f"{artifact_dir} has no {MANIFEST}: the {stage} stage has not completed; run `qlora stage {stage}`"
        )
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise InputError(f"{path} is corrupt ({exc}); re-run `qlora stage {stage}`") from None


def verify_artifact(artifact_dir: Path, stage: str) -> Manifest:
    """Re-hash every file of a parent artifact; refuse missing, extra or altered files with one line."""
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir, stage)
    actual = hash_tree(artifact_dir)
    for rel, digest in manifest.outputs.items():
        if rel not in actual:
            raise InputError(
                f"{artifact_dir / rel} is missing but listed in its manifest; re-run `qlora stage {stage}`"
            )
        if actual[rel] != digest:
            raise InputError(
                f"{artifact_dir / rel} does not match its manifest (sha256 {actual[rel][:12]}… ≠ "
                f"{digest[:12]}…): the file was altered or corrupted; re-run `qlora stage {stage}`"
            )
    extra = sorted(set(actual) - set(manifest.outputs))
    if extra:
        raise InputError(
            f"{artifact_dir / extra[0]} is not listed in the {stage} manifest (added after the stage ran); "
            f"remove it or re-run `qlora stage {stage}`"
        )
    return manifest


def manifest_digest(artifact_dir: Path) -> str:
    return sha256_file(Path(artifact_dir) / MANIFEST)
