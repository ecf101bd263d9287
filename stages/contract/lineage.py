"""Lineage of a release bundle: every file's sha256 and the chain of stage manifests behind it.

`verify` re-hashes a bundle against its lineage.json; `trace` walks from any served file back to the
dataset bytes, the code commit and the params, through the manifests the bundle carries.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.artifacts import hash_tree, sha256_file
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.signing import PROVENANCE, SIGNATURE

LINEAGE = "lineage.json"
# which stage produced each top-level folder of a bundle
PRODUCER = {"model": "merge", "gguf": "export", "gptq": "export", "adapter": "train", "report": "evaluate"}


def verify_bundle(bundle: Path) -> dict[str, Any]:
    """Re-hash every file; raise InputError naming the first file that is missing, altered or unlisted."""
    bundle = Path(bundle)
    path = bundle / LINEAGE
    if not path.exists():
        raise InputError(f"{bundle} has no {LINEAGE}; it is not a release bundle")
    odd = first_odd_entry(bundle)
    if odd is not None:
        raise InputError(f"{odd[0]} is {odd[1]}: a release bundle holds only regular files and folders")
    lineage = json.loads(path.read_text())
    listed: dict[str, str] = lineage["files"]
    actual = hash_tree(bundle, exclude=frozenset({LINEAGE, PROVENANCE, SIGNATURE}))
    for rel, digest in sorted(listed.items()):
        if rel not in actual:
            raise InputError(f"{bundle / rel} is missing from the bundle (listed in {LINEAGE})")
        if actual[rel] != digest:
            raise InputError(f"{bundle / rel} does not match {LINEAGE}: sha256 {actual[rel][:16]}… ≠ {digest[:16]}…")
    extra = sorted(set(actual) - set(listed))
    if extra:
        raise InputError(f"{bundle / extra[0]} is in the bundle but not in {LINEAGE} (added after release)")
    if (bundle / PROVENANCE).is_file():
        subjects = json.loads((bundle / PROVENANCE).read_text())["subject"]
        present = {**actual, LINEAGE: sha256_file(bundle / LINEAGE)}
        for subject in subjects:
            if present.get(subject["name"]) != subject["digest"]["sha256"]:
                raise InputError(f"{bundle / subject['name']} does not match {PROVENANCE}")
    return {"files": len(listed), "bundle": str(bundle), "signed": (bundle / SIGNATURE).is_file()}


def first_odd_entry(root: Path) -> tuple[Path, str] | None:
    """The first entry under `root` that is not a regular file or folder (a symlink, a FIFO, a device, a socket),
    found without following links or opening anything (hashing a FIFO would hang, a link would read outside)."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            entry = Path(folder) / name
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                return entry, f"a symlink (to {os.readlink(entry)})"
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device file"
                return entry, kind
    return None


def find_bundle_of(file: Path, search: list[Path]) -> tuple[Path, str]:
    """The bundle (among `search` roots) holding a file with this file's sha256, and its path inside it."""
    digest = sha256_file(file)
    candidates = []
    file = Path(file).resolve()
    for parent in [file.parent, *file.parents]:
        if (parent / LINEAGE).exists():
            candidates.append(parent)
            break
    for root in search:
        if root.exists():
            candidates.extend(p.parent for p in sorted(root.rglob(LINEAGE)))
    for bundle in candidates:
        files = json.loads((bundle / LINEAGE).read_text())["files"]
        for rel, d in files.items():
            if d == digest:
                return bundle, rel
    raise InputError(
        f"no release bundle lists a file with the sha256 of {file} ({digest[:16]}…); it was not "
        "released by this pipeline, or it was modified after release"
    )


def trace_chain(bundle: Path, rel: str) -> list[str]:
    """Human-readable chain from a bundled file back to its dataset, commit and params."""
    lineage = json.loads((bundle / LINEAGE).read_text())
    stages = lineage["stages"]
    top = rel.split("/", 1)[0]
    producer = PRODUCER.get(top, "release")
    order = ["export", "merge", "evaluate", "train", "quantize", "prepare"]
    start = order.index(producer) if producer in order else 0
    lines = [
        f"file      {rel}  sha256 {lineage['files'][rel]}",
        f"bundle    {bundle}  ({lineage['release_id']})",
        f"code      commit {lineage['code_version'].get('commit')}  dirty={lineage['code_version'].get('dirty')}",
    ]
    for name in order[start:]:
        if name == "evaluate" and producer != "evaluate":
            continue
        m = stages.get(name)
        if not m:
            continue
        params = json.dumps(m["params"], sort_keys=True)
        lines.append(
            f"{name:<9} made {m['created_at']}  commit {m['code_version'].get('commit')}  "
            f"mlflow run {m.get('mlflow_run_id')}  params {params[:300]}"
        )
        if name == "train":
            lines.append(
                f"          adapter trained from quantized base sha256 "
                f"{stages['quantize']['outputs'].get('model/model.safetensors', '?')}"
            )
    prep = stages.get("prepare", {})
    data = {k: v for k, v in prep.get("inputs", {}).items() if k.startswith("dataset/")}
    lines.append(f"dataset   {len(data)} source file(s), combined sha256 {lineage['dataset_sha256']}")
    for k, v in sorted(data.items()):
        lines.append(f"          {k}  {v}")
    base = {k: v for k, v in prep.get("inputs", {}).items() if not k.startswith("dataset/")}
    for k, v in sorted(base.items()):
        lines.append(f"base      {k}  {v}")
    if lineage.get("dvc_lock_sha256"):
        lines.append(f"dvc.lock  sha256 {lineage['dvc_lock_sha256']}")
    return lines
