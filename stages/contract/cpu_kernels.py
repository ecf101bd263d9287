"""Builds kernels/dropout_native.c for this CPU and hands it to kernels/dropout_cpu.py once a child process ran it.

Why compile anything: the dropout masks in torch ops were 8 % of a padded CPU training step (docs/speed.md, "The
dropout masks compiled"). Why a C compiler at setup and not a JIT: numba did the same in the training process, but
its LLVM added 130 MB to the peak RSS; a 24 KB library loaded through ctypes adds nothing measurable.

Crash safety, as the GGUF reader's build and the allocator's probe: the library is built with this machine's C
compiler (``CC``, else ``cc``) for this CPU (``-march=native``, with OpenMP where the compiler has it), then a child
process loads it over torch and checks its masks against the torch reference; only a library whose child passed is
loaded by the pipeline, and its own process checks it once more first. The verdict is kept per source, compiler,
CPU flags, Python and torch under ``$QLORA_CACHE_DIR/cpu-kernels/``. No compiler, a failed build or a failed check:
the torch reference makes the masks (the same values, slower) and one line says why. ``QLORA_CPU_KERNELS=off``
skips all of it. ``make setup`` builds and probes (``python -m qlora_pipeline.stages.contract.cpu_kernels``); else
the first training on a machine does (a few seconds).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from qlora_pipeline.kernels import dropout_cpu
from qlora_pipeline.stages.contract.native_probe import (
    Verdict,
    keep_verdict,
    native_build_key,
    package_version,
    read_verdict,
    run_probe,
)

log = logging.getLogger(__name__)

SOURCE = Path(dropout_cpu.__file__).with_name("dropout_native.c")
"""The kernels' C source, shipped beside the module that loads the library (package data)."""
LIBRARY_NAME = "libqlora_cpu_kernels.so"
BUILD_TIMEOUT_S = 120
PROBE_TIMEOUT_S = 120
PROBE_CODE = """
import sys
from pathlib import Path
import torch
from qlora_pipeline.kernels import dropout_cpu
problem = dropout_cpu.use_library(Path(sys.argv[1]))
print("probe ok" if problem is None else f"probe failed: {problem}")
"""
"""What the probe's child runs: torch first (its OpenMP runtime is the one the library then shares), the library
loaded, and its masks checked against the reference on several sizes and both bit widths."""


def compiler() -> str | None:
    """The C compiler to build with: ``CC``, else ``cc``, else ``gcc``."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(cc: str, out: Path) -> str | None:
    """Compile the library to `out` (with OpenMP, else without); None on success, else the compiler's last line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.tmp")
    base = [cc, "-O3", "-march=native", "-fPIC", "-shared", "-o", str(partial), str(SOURCE)]
    last = "no output"
    for extra in (["-fopenmp"], []):
        try:
            done = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{cc} could not run: {e}"
        if done.returncode == 0:
            partial.replace(out)
            return None
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{cc} failed: {last}"


def probe(library: Path) -> Verdict:
    """Run :data:`PROBE_CODE` on the library in a child process."""
    return run_probe(
        PROBE_CODE,
        [str(library)],
        passed_line="probe ok",
        ok_reason="built for this CPU; its masks equal the torch reference's",
        timeout_s=PROBE_TIMEOUT_S,
    )


def _paths(cc: str) -> tuple[Path, Path]:
    """(the library, its verdict) for this source, compiler, CPU, Python and torch."""
    from qlora_pipeline.stages.lm.modelio import cache_dir

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    first_line = version.splitlines()[0] if version else ""
    key = native_build_key([SOURCE], cc, first_line, sys.version, package_version("torch"))
    folder = cache_dir() / "cpu-kernels" / key
    return folder / LIBRARY_NAME, folder / "verdict.json"


def prepare(force: bool = False) -> tuple[Verdict, Path | None]:
    """Build and probe once per machine (again with `force`); the verdict and the library it is about."""
    cc = compiler()
    if cc is None:
        return Verdict(False, "no C compiler (set CC, or install cc)"), None
    library, verdict_path = _paths(cc)
    if not force:
        kept = read_verdict(verdict_path)
        if kept is not None and (library.is_file() or not kept.ok):  # a passed library that is gone: build again
            return kept, library
    failed = build(cc, library)
    verdict = Verdict(False, failed) if failed else probe(library)
    keep_verdict(verdict_path, verdict)
    return verdict, library


def enable() -> str:
    """Put the compiled dropout kernels in use in this process where they built and passed here; one line on what
    the CPU's dropout masks come from (logged as a warning when it is not the compiled kernels)."""
    if dropout_cpu.switched_off():
        return f"CPU dropout masks: torch reference ({dropout_cpu.SWITCH_VAR}=off)"
    if dropout_cpu.compiled_in_use():
        return "CPU dropout masks: compiled kernels"
    verdict, library = prepare()
    problem = dropout_cpu.use_library(library) if verdict.ok and library is not None else verdict.reason
    if problem is None:
        return f"CPU dropout masks: compiled kernels ({verdict.reason})"
    line = f"CPU dropout masks: torch reference, slower (the compiled kernels are unusable here: {problem})"
    log.warning(line)
    return line


def main() -> None:
    """``python -m qlora_pipeline.stages.contract.cpu_kernels [--force]``: build and probe (again, with --force)
    and say what the masks will come from; ``make setup`` runs it."""
    if "--force" in sys.argv[1:]:
        prepare(force=True)
    print(enable())


if __name__ == "__main__":
    main()
