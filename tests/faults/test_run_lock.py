"""Two runs in one checkout: the second is refused in one line naming the holder, and takes over once the holder
is dead (kill -9), with nothing of the holder's deleted meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

CLI = [sys.executable, "-m", "qlora_pipeline.pipelines.cli"]


def _stage(stage: str, params: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "stage", stage, "-p", str(params)], capture_output=True, text=True, timeout=300)


def test_a_second_run_is_refused_while_the_first_holds_the_artifacts(tiny_run: Path) -> None:
    artifacts = tiny_run.parent / "artifacts"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from qlora_pipeline.stages.contract.run_lock import run_lock\n"
            f"with run_lock(Path({str(artifacts)!r}), 'qlora stage train'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(300)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        in_flight = artifacts / ".train.tmp-inflight"  # what the holder is writing
        in_flight.mkdir()
        refused = _stage("prepare", tiny_run)
        assert refused.returncode == 2, refused.stderr
        line = refused.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and f"is in use by pid {holder.pid} on " in line, line
        assert "(qlora stage train)" in line and "wait for that run to end" in line, line
        assert in_flight.is_dir(), "the holder's temporary folder is left alone"
        assert not (artifacts / "prepare").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    taken = _stage("prepare", tiny_run)  # the dead holder's lock went with it
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert (artifacts / "prepare" / "manifest.json").is_file()
    assert not in_flight.exists(), "a dead run's temporary folder is cleaned by the next run"
