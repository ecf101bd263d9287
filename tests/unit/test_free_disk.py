"""Setup's disk check (pipelines/free_disk.py): run by the system's Python before any venv exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from qlora_pipeline.pipelines.free_disk import shortfall
from qlora_pipeline.stages.contract.runtime import REPO_ROOT

SCRIPT = REPO_ROOT / "pipelines" / "free_disk.py"


def test_enough_disk_says_nothing_and_too_little_says_how_much(tmp_path: Path) -> None:
    free_gib = shutil.disk_usage(tmp_path).free / 2**30
    assert shortfall(0.001, tmp_path / "not" / "made" / "yet", "x") is None
    line = shortfall(free_gib * 4 + 1, tmp_path / "venv", "make setup (.venv)")
    assert line is not None and line.startswith("make setup (.venv) needs about")
    assert str(tmp_path.resolve()) in line and "free some space there" in line


def test_the_script_runs_without_the_venv_and_exits_2(tmp_path: Path) -> None:
    """Started with `-I -S` (no site-packages, no repo on the path): it needs the standard library alone."""
    run = [sys.executable, "-I", "-S", str(SCRIPT)]
    ok = subprocess.run([*run, "0.001", str(tmp_path), "a step"], capture_output=True)
    assert ok.returncode == 0 and ok.stdout == ok.stderr == b""
    short = subprocess.run([*run, "1e9", str(tmp_path), "a step"], capture_output=True, text=True)
    assert short.returncode == 2 and short.stdout == ""
    assert len(short.stderr.strip().splitlines()) == 1 and short.stderr.startswith("a step needs about 1e+09 GiB")
