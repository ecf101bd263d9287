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
    """Yield a fresh temp dir next to ``final``; on success make it durable and swap it into place, on failure
    delete it.

    The temp dir is ``.<name>.tmp-*`` with mode 0o755 (``mkdtemp`` makes it private; outputs are shared with serving
    teams and auditors). On success every file in it and the folder itself are fsynced, then three renames: temp ->
    ``.<name>.new-*`` (complete), old ``final`` -> ``.<name>.old-*``, new -> ``final``; the parent is fsynced and
    the old copy removed. A process killed (or a machine losing power) anywhere in that leaves a state
    ``recover_swaps`` completes on the next start: a complete new copy is put in place, else the old one is put
    back. ``final`` is never half-written, and never lost.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stamp = f"{os.getpid()}-{int(time.time() * 1e6)}"
    new = final.parent / f".{final.name}.new-{stamp}"
    os.replace(tmp, new)
    trash = None
    if final.exists():
        trash = final.parent / f".{final.name}.old-{stamp}"
        os.replace(final, trash)
    os.replace(new, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file under ``root`` and every folder of it on stable storage (a power loss cannot empty them)."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def recover_swaps(parent: Path) -> list[str]:
    """Finish the swaps of ``atomic_dir`` a killed process left half-done in ``parent`` (returns what it did): where a
    destination is missing, its complete ``.new-`` copy goes in place, else its ``.old-`` copy goes back. What is left
    of temp, new and old copies is then removed."""
    if not parent.is_dir():
        return []
    done = []
    leftovers = sorted(p for p in parent.iterdir() if p.name.startswith(".") and p.is_dir())
    for kind in (".new-", ".old-"):
        for p in leftovers:
            name, sep, _ = p.name[1:].partition(kind)
            if sep and p.exists() and not (parent / name).exists():
                os.replace(p, parent / name)
                done.append(f"{parent / name} restored from its {kind.strip('.-')} copy")
    for p in leftovers:
        if p.exists() and any(k in p.name for k in (".tmp-", ".new-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)
    if done:
        fsync_dir(parent)
    return done


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


__all__ = ["atomic_dir", "atomic_file", "fsync_dir", "fsync_tree", "recover_swaps"]
