"""A disk that fills up under a stage: one line naming the path and the space left, exit 2, no retry, nothing
half-written, the parent artifact intact. The artifacts live on a small tmpfs (mounting one needs root)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import tiny

CLI = [sys.executable, "-m", "qlora_pipeline.pipelines.cli"]


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    model = tiny.make_model_dir(tmp_path / "model", "llama")
    data = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.qa_rows(20))
    raw = tiny.params_for(tmp_path, model, data)
    raw["tracking"]["artifacts_dir"] = str(small_disk / "artifacts")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    run = lambda stage: subprocess.run(  # noqa: E731
        [*CLI, "stage", stage, "-p", str(params)], capture_output=True, text=True, timeout=300
    )
    assert run("prepare").returncode == 0
    prepared = json.loads((small_disk / "artifacts" / "prepare" / "manifest.json").read_text())
    ballast = small_disk / "ballast"
    with ballast.open("wb") as f:  # leave about 100 KiB: less than quantize writes
        free = subprocess.run(["df", "--output=avail", "-B1", str(small_disk)], capture_output=True, text=True)
        f.write(b"\0" * (int(free.stdout.split()[-1]) - 100 * 1024))
    full = run("quantize")
    assert full.returncode == 2, full.stderr[-3000:]
    line = full.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("error: disk full while quantize wrote ") and "MiB free there; quantize writes about" in line
    ), line
    assert "nothing of this run was kept" in line
    art = small_disk / "artifacts"
    assert not (art / "quantize").exists()
    assert not [p.name for p in art.iterdir() if ".tmp-" in p.name], "no half-written temporary folder"
    assert json.loads((art / "prepare" / "manifest.json").read_text()) == prepared
    ballast.unlink()
    assert run("quantize").returncode == 0, "with space again, the same command succeeds"
