"""One stage run at a time per artifacts folder: an exclusive lock on `<artifacts>/.lock` for the whole of `execute`.

Without it two runs in one checkout delete each other's temporary folders (`clean_stale_temps`), write the same
checkpoints and publish over each other. The lock is `fcntl.flock` on an open file: the kernel drops it when the
holder exits however it dies (kill -9, power loss), so a stale lock cannot outlive its process and is simply taken
by the next run; the file's text (pid, host, start time, command) only names the holder in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from qlora_pipeline.stages.contract.errors import PipelineError

LOCK_NAME = ".lock"


class RunLocked(PipelineError):
    """Another run holds the artifacts folder."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextlib.contextmanager
def run_lock(artifacts: Path, what: str) -> Iterator[None]:
    """Hold the artifacts folder for `what` (e.g. 'qlora stage train'); RunLocked in one line, naming the holder,
    when another live process holds it."""
    artifacts.mkdir(parents=True, exist_ok=True)
    path = artifacts / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"{artifacts} is in use by {_holder(path)}; wait for that run to end or stop it, then run again"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": what or " ".join(sys.argv[:3]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
