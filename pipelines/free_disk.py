"""``python3 pipelines/free_disk.py GIB PATH WHAT``: exit 2 with one line when PATH's disk has less than GIB GiB free.

Why: ``make setup`` writes a few GiB of virtual environments, and pip that runs out of disk halfway leaves a broken
one and a screen of warnings (a CI run on a full shared disk ended that way). This runs before anything is written,
with the system's Python and nothing but its standard library, since the environment it guards is not there yet.
The sizes the Makefile and .ci/run ask for are measured; the Makefile says what they were.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def shortfall(need_gib: float, path: Path, what: str) -> str | None:
    """The line to print when `path`'s disk cannot take `need_gib` GiB for `what`, else None."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free_gib = shutil.disk_usage(existing).free / 2**30
    if free_gib >= need_gib:
        return None
    return (
        f"{what} needs about {need_gib:g} GiB free on the disk of {existing.resolve()}, which has {free_gib:.1f} GiB: "
        "free some space there (old clones, caches) and run it again"
    )


def main(argv: list[str]) -> int:
    need, path, what = float(argv[0]), Path(argv[1]), " ".join(argv[2:]) or "this step"
    line = shortfall(need, path, what)
    if line is None:
        return 0
    print(line, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
