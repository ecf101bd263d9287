"""Which C allocator a pipeline process takes its CPU tensors from (:func:`run_on_host_allocator`).

Why: torch allocates CPU tensors with ``malloc``. glibc's heap keeps every freed gap resident until a request of a
fitting size reuses it, and a training step frees and allocates tensors of a hundred sizes that change with every
batch's length, so the heap fills with gaps (host_heap.py bounds the worst of it). mimalloc (Microsoft's allocator,
MIT licence; the ``cmeel-mimalloc`` wheel ships it prebuilt for manylinux) keeps each size class on pages of its
own and hands freed pages back to the system after a delay. Measured on the 2-core AVX2 VM, SmolLM2 on bnb +
peft's padded batches, fp32, 8 steps, one process each (docs/speed.md): peak RSS 2,433-2,502 MB on glibc with
host_heap's bound, 1,899 MB on mimalloc, median step 3.61-3.73 s against 3.69 s, tokens/s 71.4 against 82.0 (its
longest batch ran faster). mimalloc's transparent huge pages are turned off (``MIMALLOC_ALLOW_THP=0``; a value
the environment sets wins): with them the same run took 3.86-4.05 s a step.

An allocator replaces ``malloc`` for a whole process only when the dynamic loader preloads it, before the first
allocation. So the CLI calls :func:`run_on_host_allocator` first thing, which re-executes the same command once
with ``LD_PRELOAD`` naming the library; the new process puts ``LD_PRELOAD`` back as it was, so the processes it
starts (the Prefect server, the GGUF reader) keep the system allocator. A preloaded library that crashes would take
the process down, so it is preloaded only after a child process has been seen to import torch and run a few
autograd steps with it on this machine (:func:`probe`; ``make setup`` runs it, or else the first command on a new
machine), the verdict kept per library, CPU, Python and torch under the per-machine cache. A failed probe leaves
the system allocator in place and says so once.

``QLORA_HOST_ALLOCATOR``: ``auto`` (default; mimalloc where installed and probed), ``system`` (never preload),
``mimalloc`` (require it: exit 2 where it cannot run). ``QLORA_MIMALLOC_LIBRARY`` names another build of it.
Linux with glibc only; elsewhere the system allocator stays.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.host_heap import uses_glibc
from qlora_pipeline.stages.contract.native_probe import (
    Verdict,
    keep_verdict,
    native_build_key,
    package_version,
    read_verdict,
    run_probe,
)

log = logging.getLogger(__name__)

CHOICE_VAR = "QLORA_HOST_ALLOCATOR"
LIBRARY_VAR = "QLORA_MIMALLOC_LIBRARY"
SAVED_PRELOAD_VAR = "QLORA_SAVED_LD_PRELOAD"
"""Set only in the re-executed process: the LD_PRELOAD it was started from, put back once it runs."""
CHOICES = ("auto", "system", "mimalloc")
WHEEL = "cmeel-mimalloc"
WHEEL_LIBRARY = "cmeel.prefix/lib/libmimalloc.so.3"
MIMALLOC_SETTINGS = {"MIMALLOC_ALLOW_THP": "0"}
PROBE_TIMEOUT_S = 600
PROBE_CODE = """
import torch
from qlora_pipeline.stages.contract.host_allocator import allocator_in_use
assert allocator_in_use() == "mimalloc", "the loader did not preload the library"
w = torch.randn(256, 512, requires_grad=True)
for rows in (7, 300, 1000, 33, 512):
    x = torch.randn(rows, 512)
    (x @ w.t()).relu().square().sum().backward()
    del x
if torch.cuda.is_available():
    torch.ones(1024, device="cuda").sum().item()
print("probe ok", float(w.grad.abs().sum()) > 0)
"""
"""What the probe's child runs: torch's libraries loaded over the preloaded allocator, tensors of several sizes
allocated and freed through autograd, and CUDA started where there is a GPU."""


def mimalloc_library() -> Path | None:
    """The mimalloc shared library to preload: ``QLORA_MIMALLOC_LIBRARY``, else the one the wheel installed."""
    override = os.environ.get(LIBRARY_VAR)
    if override:
        return Path(override)
    try:
        path = Path(str(metadata.distribution(WHEEL).locate_file(WHEEL_LIBRARY)))
    except metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def allocator_in_use() -> str:
    """``mimalloc`` when this process runs on it (its library is mapped), else ``system``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"


def probe(library: Path) -> Verdict:
    """Run :data:`PROBE_CODE` in a child process with the library preloaded."""
    return run_probe(
        PROBE_CODE,
        passed_line="probe ok True",
        ok_reason="ran torch with the library preloaded",
        timeout_s=PROBE_TIMEOUT_S,
        env={**os.environ, **_preload(library, os.environ)},
    )


def verdict_for(library: Path) -> Verdict:
    """The probe's verdict on this library on this machine, probed once and then read back."""
    path = _verdict_path(library)
    verdict = read_verdict(path)
    if verdict is None:
        verdict = probe(library)
        keep_verdict(path, verdict)
    return verdict


def preload_env(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to re-execute this command in so that it runs on mimalloc, or None to stay as it is
    (not asked for, already preloaded, not Linux with glibc, or the library missing or failing its probe)."""
    choice = environ.get(CHOICE_VAR, "auto") or "auto"
    if choice not in CHOICES:
        raise InputError(f"{CHOICE_VAR}={choice} is not one of {', '.join(CHOICES)}; unset it or pick one")
    if choice == "system" or SAVED_PRELOAD_VAR in environ or "libmimalloc" in environ.get("LD_PRELOAD", ""):
        return None
    library = _installed_library()
    if library is None:
        if choice == "mimalloc":
            raise InputError(
                f"{CHOICE_VAR}=mimalloc, but no mimalloc library is installed for this platform "
                f"({platform.system()} {platform.machine()}); pip install {WHEEL}, or unset {CHOICE_VAR}"
            )
        return None
    verdict = verdict_for(library)
    if not verdict.ok:
        if choice == "mimalloc":
            raise InputError(f"{CHOICE_VAR}=mimalloc, but {library} failed its probe ({verdict.reason})")
        log.warning("running on the system allocator: %s failed its probe (%s)", library, verdict.reason)
        return None
    return {**environ, **_preload(library, environ), SAVED_PRELOAD_VAR: environ.get("LD_PRELOAD", "")}


def run_on_host_allocator() -> None:
    """Re-execute this command on mimalloc where :func:`preload_env` says so (it does not return then); in the
    re-executed process, put ``LD_PRELOAD`` back as it was for the processes this one starts."""
    if SAVED_PRELOAD_VAR in os.environ:
        saved = os.environ.pop(SAVED_PRELOAD_VAR)
        if saved:
            os.environ["LD_PRELOAD"] = saved
        else:
            os.environ.pop("LD_PRELOAD", None)
        if allocator_in_use() != "mimalloc":
            log.warning("running on the system allocator: the loader did not preload mimalloc")
        return
    env = preload_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def _installed_library() -> Path | None:
    """:func:`mimalloc_library` where it is a file and this is Linux with glibc (where LD_PRELOAD replaces malloc)."""
    library = mimalloc_library() if sys.platform == "linux" and uses_glibc() else None
    return library if library is not None and library.is_file() else None


def _preload(library: Path, environ: Mapping[str, str]) -> dict[str, str]:
    current = environ.get("LD_PRELOAD", "")
    settings = {k: v for k, v in MIMALLOC_SETTINGS.items() if k not in environ}
    return {"LD_PRELOAD": f"{library}:{current}" if current else str(library), **settings}


def _verdict_path(library: Path) -> Path:
    from qlora_pipeline.stages.lm.modelio import cache_dir

    key = native_build_key([library], sys.version, package_version("torch"))
    return cache_dir() / "host-allocator" / f"{key}.json"


def main() -> None:
    """``python -m qlora_pipeline.stages.contract.host_allocator [--force]``: probe (again, with --force) and say
    which allocator the pipeline will run on; ``make setup`` runs it."""
    library = _installed_library()
    if library is None:
        why = f"not Linux with glibc, no {WHEEL}, or {LIBRARY_VAR} names no file"
        print(f"host allocator: system (no mimalloc library: {why})")
        return
    if "--force" in sys.argv[1:]:
        _verdict_path(library).unlink(missing_ok=True)
    verdict = verdict_for(library)
    which = "mimalloc" if verdict.ok else "system"
    print(f"host allocator: {which} ({library}: {verdict.reason})")


if __name__ == "__main__":
    main()
