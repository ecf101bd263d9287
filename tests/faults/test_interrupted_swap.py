"""kill -9 inside the renames that publish an artifact: the next run finds the new artifact in place if it was
complete, else the old one, never neither (before: killed between its two renames, both were gone)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qlora_pipeline.stages.contract.artifacts import clean_stale_temps

CHILD = """
import os, signal, sys
from pathlib import Path
from qlora_pipeline.kernels.formats import atomic
renames, die_after = [0], int(sys.argv[2])
real = os.replace
def replace(a, b):
    real(a, b)
    renames[0] += 1
    if renames[0] == die_after:
        os.kill(os.getpid(), signal.SIGKILL)
atomic.os.replace = replace
with atomic.atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "weights.bin").write_text("ne")
    if die_after == 0:  # killed while writing, as a checkpoint or an artifact is being written
        os.kill(os.getpid(), signal.SIGKILL)
    (tmp / "weights.bin").write_text("new")
"""


@pytest.mark.parametrize(("die_after", "expected"), [(0, "old"), (1, "old"), (2, "new"), (3, "new")])
def test_a_kill_between_the_renames_loses_neither_artifact(tmp_path: Path, die_after: int, expected: str) -> None:
    final = tmp_path / "artifacts" / "quantize"
    final.mkdir(parents=True)
    (final / "weights.bin").write_text("old")
    child = subprocess.run([sys.executable, "-c", CHILD, str(final), str(die_after)], capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    left = sorted(p.name.split("-")[0] for p in final.parent.iterdir())
    print(f"killed after rename {die_after}: {left}")
    clean_stale_temps(final.parent)  # what every stage run does first
    assert (final / "weights.bin").read_text() == expected
    assert [p.name for p in final.parent.iterdir()] == ["quantize"], "nothing else left behind"
