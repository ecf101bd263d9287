"""What every native piece the pipeline loads goes through first: a child process runs it, and the verdict is kept
per machine.

Why a child: a native library that crashes here (an instruction this CPU lacks, a loader conflict, a bad build) must
take down a throwaway process, never the pipeline or the test runner. Why keep the verdict: the child costs seconds
(torch's import), and its answer changes only with the library's bytes, the CPU, Python or torch, which the key
(:func:`native_build_key`) hashes. Its users: the GGUF reader's smoke check (preflight.py), the C allocator's probe
(host_allocator.py) and the compiled dropout masks' probe (cpu_kernels.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from qlora_pipeline.kernels.formats.atomic import atomic_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Whether a native library ran in a child process on this machine, and if not, how that child ended."""

    ok: bool
    reason: str


def native_build_key(files: Iterable[Path], *extra: str) -> str:
    """A hash of native libraries (each file's name and bytes, in the order given), this CPU's flags and `extra`:
    what a verdict on whether those libraries run on this machine depends on, so another build or another CPU is
    checked anew."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    h.update(flags.encode())
    for part in extra:
        h.update(part.encode())
    return h.hexdigest()[:24]


def package_version(name: str) -> str:
    """An installed distribution's version, or ``absent`` (a part of a key, so never an error)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def run_probe(
    code: str,
    args: Iterable[str] = (),
    *,
    passed_line: str,
    ok_reason: str,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> Verdict:
    """Run ``python -c code args`` in a child; it passed when it exits 0 with `passed_line` as its last line of
    output. Otherwise the verdict names how it ended: the signal it died of, or its exit status and its last line
    (the child's own "failed: ..." line where it printed one, else the last line of its traceback)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return Verdict(False, f"the probe did not finish in {timeout_s:g} s")
    out = done.stdout.strip().splitlines()
    if done.returncode == 0 and out and out[-1] == passed_line:
        return Verdict(True, ok_reason)
    if done.returncode < 0:
        return Verdict(False, f"the probe died of {_signal_name(-done.returncode)}")
    err = done.stderr.strip().splitlines()
    last = (out if done.returncode == 0 and out else err or out or ["no output"])[-1]
    return Verdict(False, f"the probe exited {done.returncode}: {last}")


def read_verdict(path: Path) -> Verdict | None:
    """The verdict kept at `path`, or None where there is none (or it cannot be read: probe again)."""
    try:
        return Verdict(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def keep_verdict(path: Path, verdict: Verdict) -> None:
    """Keep `verdict` at `path`, whole or not at all (another process may read it at the same moment); a cache that
    cannot be written costs only a probe next time, so that is a warning, not an error."""
    try:
        with atomic_file(path) as partial:
            partial.write_text(json.dumps(asdict(verdict)))
    except OSError:
        log.warning("could not keep a native probe's verdict in %s; it will run again", path.parent)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
