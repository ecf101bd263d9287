"""Publish a directory or a file atomically: write next to the destination, then rename into place.

The one home of this logic for every writer of the project (format writers here, the stages' artifact directories).
Both helpers write into a hidden sibling of the destination, so the final rename stays on one filesystem; on any
error the sibling is removed and an existing destination is left untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp dir next to ``final``; on success swap it into place, on failure delete it.

    The temp dir is ``.<name>.tmp-*`` with mode 0o755 (``mkdtemp`` makes it private; outputs are shared with serving
    teams and auditors). The swap is two renames: old ``final`` -> ``.<name>.old-*`` trash, temp -> ``final``, then
    the trash is removed. Between the renames ``final`` is absent, never half-written. A process killed mid-way
    leaves only dot-named ``.tmp-``/``.old-`` siblings behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trash = None
    if final.exists():
        trash = final.parent / f".{final.name}.old-{os.getpid()}-{int(time.time() * 1e6)}"
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temp path next to ``final`` for the caller to create; on success fsync it and ``os.replace`` it onto
    ``final``, on failure delete it.

    The temp file is ``.<name>.<pid>-<random>.tmp``; it is not created here, so the file gets the mode the caller's
    writer gives it. One rename: readers see the old file or the new one, never a partial one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["atomic_dir", "atomic_file"]
