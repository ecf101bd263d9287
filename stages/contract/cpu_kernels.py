"""Builds the compiled CPU kernels for this CPU and hands them to their twins once a child process ran them:
kernels/dropout_native.c (the LoRA dropout masks, kernels/dropout_cpu.py) and kernels/optim/adamw8bit_native.c
(the 8-bit AdamW step, kernels/optim/adamw8bit_cpu.py), one library.

Why compile anything: the dropout masks in torch ops were 8 % of a padded CPU training step, and the 8-bit AdamW
step in torch ops five times the 32-bit one (docs/speed.md, "The dropout masks compiled", "The 8-bit AdamW step
compiled"). Why a C compiler at setup and not a JIT: numba did the masks in the training process, but its LLVM
added 130 MB to the peak RSS; a small library loaded through ctypes adds nothing measurable.

Crash safety, as the GGUF reader's build and the allocator's probe (stages/contract/native_probe.py): the library
is built with this machine's C compiler (``CC``, else ``cc``) for this CPU (``-march=native``, with OpenMP where the
compiler has it; ``-ffp-contract=off``, so no multiply-add becomes an FMA the references do not have;
``-fno-math-errno -fno-trapping-math``, which change no value and let it vectorize ``sqrtf`` and compares), then a child
process loads it over torch and checks every kernel against its torch reference; only a library whose child
passed is loaded by the pipeline, and its own process checks it once more first. The verdict is kept per source,
compiler, CPU flags, Python and torch under ``$QLORA_CACHE_DIR/cpu-kernels/``. No compiler, a failed build or a
failed check: the torch references compute the same bits, slower, and one line says why. ``QLORA_CPU_KERNELS=off``
(kernels/cpu_native.py) skips all of it. ``make setup`` builds and probes (``python -m
qlora_pipeline.stages.contract.cpu_kernels``); else the first training on a machine does (a few seconds).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from qlora_pipeline.kernels import cpu_native, dropout_cpu
from qlora_pipeline.kernels.optim import adamw8bit_cpu
from qlora_pipeline.stages.contract.native_probe import (
    Verdict,
    keep_verdict,
    native_build_key,
    package_version,
    read_verdict,
    run_probe,
)

log = logging.getLogger(__name__)

SOURCES = (
    Path(dropout_cpu.__file__).with_name("dropout_native.c"),
    Path(adamw8bit_cpu.__file__).with_name("adamw8bit_native.c"),
)
"""The kernels' C sources, each shipped beside the module that loads it (package data), built into one library."""
TWINS = {"dropout masks": dropout_cpu, "8-bit AdamW": adamw8bit_cpu}
"""Each kernel family's Python twin: its ``use_library(path)`` checks it against the torch reference."""
LIBRARY_NAME = "libqlora_cpu_kernels.so"
BUILD_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
BUILD_TIMEOUT_S = 120
PROBE_TIMEOUT_S = 120
PROBE_CODE = """
import sys
from pathlib import Path
import torch
from qlora_pipeline.stages.contract.cpu_kernels import TWINS
problems = [f"{name}: {p}" for name, twin in TWINS.items() if (p := twin.use_library(Path(sys.argv[1])))]
print("probe ok" if not problems else f"probe failed: {'; '.join(problems)}")
"""
"""What the probe's child runs: torch first (its OpenMP runtime is the one the library then shares), the library
loaded, and each kernel checked against its reference (several sizes, dtypes, NaN and Inf where they apply)."""


def compiler() -> str | None:
    """The C compiler to build with: ``CC``, else ``cc``, else ``gcc``."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(cc: str, out: Path) -> str | None:
    """Compile the library to `out` (with OpenMP, else without); None on success, else the compiler's last line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.tmp")
    base = [cc, *BUILD_FLAGS, "-o", str(partial), *map(str, SOURCES)]
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
        ok_reason="built for this CPU; every kernel's results equal its torch reference's",
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
    key = native_build_key(list(SOURCES), cc, first_line, " ".join(BUILD_FLAGS), sys.version, package_version("torch"))
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


def expected_in_use() -> bool:
    """Whether CPU training here runs the compiled kernels: in use in this process, or built and passed on this
    machine before (its kept verdict), and not switched off. Builds nothing: what the memory plan counts by."""
    if cpu_native.switched_off():
        return False
    if all(twin.compiled_in_use() for twin in TWINS.values()):
        return True
    cc = compiler()
    if cc is None:
        return False
    library, verdict_path = _paths(cc)
    kept = read_verdict(verdict_path)
    return kept is not None and kept.ok and library.is_file()


def enable() -> str:
    """Put the compiled kernels in use in this process where they built and passed here; one line on where the CPU's
    dropout masks and 8-bit AdamW steps come from (logged as a warning when it is not the compiled kernels)."""
    names = " and ".join(TWINS)
    if cpu_native.switched_off():
        return f"CPU {names}: torch reference ({cpu_native.SWITCH_VAR}=off)"
    if all(twin.compiled_in_use() for twin in TWINS.values()):
        return f"CPU {names}: compiled kernels"
    verdict, library = prepare()
    if not verdict.ok or library is None:
        problem = verdict.reason
    else:
        failed = {name: p for name, twin in TWINS.items() if (p := twin.use_library(library))}
        problem = "; ".join(f"{name}: {p}" for name, p in failed.items()) or None
    if problem is None:
        return f"CPU {names}: compiled kernels ({verdict.reason})"
    line = f"CPU {names}: torch reference where a kernel is unusable, slower ({problem})"
    log.warning(line)
    return line


def main() -> None:
    """``python -m qlora_pipeline.stages.contract.cpu_kernels [--force]``: build and probe (again, with --force)
    and say what the masks and the 8-bit steps will come from; ``make setup`` runs it."""
    if "--force" in sys.argv[1:]:
        prepare(force=True)
    print(enable())


if __name__ == "__main__":
    main()
