"""The commit and dirty flag every manifest and release records, checked against real git, not against themselves."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from qlora_pipeline.stages import release
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.runtime import REPO_ROOT, code_version


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "stages").mkdir(parents=True)
    (root / "stages" / "train.py").write_text("STEPS = 60\n")
    (root / "params.yaml").write_text("train: {}\n")
    (root / ".gitignore").write_text("/artifacts/\n")
    _git(root, "init", "-q")
    _git(root, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    _git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "base")
    return root


def test_commit_is_git_rev_parse_head_and_a_clean_tree_is_clean(repo: Path) -> None:
    assert code_version(repo) == {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": False}


@pytest.mark.parametrize(
    ("change", "dirty"),
    [
        (lambda r: (r / "stages" / "train.py").write_text("STEPS = 61\n"), True),  # edited code
        (lambda r: (r / "stages" / "helper.py").write_text("X = 1\n"), True),  # a new module nobody committed
        (lambda r: (r / "stages" / "train.py").unlink(), True),  # deleted code
        (lambda r: (r / "params.yaml").write_text("train: {lr: 1}\n"), False),  # recorded in the lineage itself
        (lambda r: (r / "metrics").mkdir() or (r / "metrics" / "train.json").write_text("{}"), False),
        (lambda r: (r / "artifacts").mkdir() or (r / "artifacts" / "x.bin").write_bytes(b"x"), False),  # ignored
        (lambda r: (r / "notes.txt").write_text("scratch"), False),  # untracked, but not in a code folder
    ],
    ids=["edited", "untracked-module", "deleted", "params", "metrics", "ignored", "untracked-outside-code"],
)
def test_dirty_flag_follows_real_git(repo: Path, change, dirty: bool) -> None:
    change(repo)
    assert code_version(repo)["dirty"] is dirty


def test_release_refuses_an_untracked_module_in_the_real_checkout() -> None:
    """release asks git about this very checkout: a module nobody committed must stop a strict release."""
    strict = SimpleNamespace(params=SimpleNamespace(release=SimpleNamespace(allow_dirty=False)))
    probe = REPO_ROOT / "stages" / f"_probe_{uuid.uuid4().hex[:8]}.py"
    probe.write_text("UNCOMMITTED = True\n")
    try:
        assert code_version()["dirty"] is True
        with pytest.raises(InputError, match="the working tree has uncommitted changes"):
            release.body(strict)
    finally:
        probe.unlink()
    assert code_version()["commit"] == _git(REPO_ROOT, "rev-parse", "HEAD")
