"""Build and install the GGUF reader (llama-cpp-python) for this machine, and prove it loads a model.

    python -m qlora_pipeline.pipelines.reader_install [--cpu auto|x86-64-v2|x86-64-v3|x86-64-v4|FLAG,FLAG,...] [--force]

Why not `pip install llama-cpp-python`: it compiles llama.cpp with ``GGML_NATIVE`` (``-march=native``), which on a
CPU that advertises AMX emits tile instructions (``ldtilecfg``) that fault with SIGSEGV where the OS or the
hypervisor has not granted AMX state; and pip caches that wheel under the same name for every later install, on
any CPU that shares the cache. Here:

- the instruction sets are named explicitly (``GGML_NATIVE=OFF``): by default the ones ``/proc/cpuinfo`` lists
  for this CPU, which the kernel only lists when the OS saves their register state. AMX is never enabled (GGUF
  scoring does not need it). ``--cpu`` or ``QLORA_READER_CPU`` pick a portable level instead (x86-64-v3 = AVX2,
  FMA, F16C, BMI2, no AVX-512), and ``QLORA_READER_CMAKE_ARGS`` replaces the whole flag set;
- the wheel is built without pip's cache and kept in ``$QLORA_CACHE_DIR/wheels/<version>-<flags hash>/``, so a
  machine with another CPU builds its own;
- after installing, a child process loads the packaged SmolLM2 GGUF and evaluates a few tokens. If that child
  dies, the build is redone at the portable baseline x86-64-v2 (SSE4.2 only) and checked again; if that dies too,
  the install fails with a message and exit 1. Nothing is reported done that was not seen to run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qlora_pipeline.stages.contract.errors import PipelineError
from qlora_pipeline.stages.lm.modelio import cache_dir, embedded_gguf_path

LLAMA_CPP_PYTHON = "0.3.36"
# GGML option <- the /proc/cpuinfo flags that must all be present (GGML_AVX512 compiles with F, CD, VL, DQ, BW).
GGML_ISA: dict[str, tuple[str, ...]] = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "AVX2": ("avx2",),
    "FMA": ("fma",),
    "F16C": ("f16c",),
    "BMI2": ("bmi2",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
}
LEVELS: dict[str, tuple[str, ...]] = {
    "x86-64-v2": ("SSE42",),
    "x86-64-v3": ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2"),
    "x86-64-v4": ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2", "AVX512"),
}
BASELINE = "x86-64-v2"
# Left out of every build: AMX (faults where tile state is not granted) and what the reader never uses.
ALWAYS = ("-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DLLAVA_BUILD=OFF")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def isa_options(cpu: str, flags: set[str]) -> tuple[str, ...]:
    """GGML instruction-set options to switch on for `cpu` (auto, a level name, or a comma list of options)."""
    if cpu == "auto":
        return tuple(opt for opt, need in GGML_ISA.items() if all(f in flags for f in need))
    if cpu in LEVELS:
        return LEVELS[cpu]
    wanted = tuple(o.strip().upper() for o in cpu.split(",") if o.strip())
    unknown = [o for o in wanted if o not in GGML_ISA]
    if unknown:
        raise PipelineError(
            f"unknown reader CPU option {unknown[0]}; use auto, {', '.join(LEVELS)} or a comma list of "
            f"{', '.join(GGML_ISA)}"
        )
    return wanted


def cmake_args(cpu: str) -> str:
    """The CMAKE_ARGS of the build (QLORA_READER_CMAKE_ARGS overrides everything)."""
    override = os.environ.get("QLORA_READER_CMAKE_ARGS")
    if override:
        return override
    if platform.machine() not in ("x86_64", "AMD64"):
        return " ".join(a for a in ALWAYS if "NATIVE" not in a)  # no AMX elsewhere; native is safe there
    on = set(isa_options(cpu, cpu_flags()))
    return " ".join([*ALWAYS, *(f"-DGGML_{opt}={'ON' if opt in on else 'OFF'}" for opt in GGML_ISA)])


def build_wheel(args: str) -> Path:
    """The wheel for these CMake args, from our cache or built now (pip's cache bypassed: it ignores CMAKE_ARGS)."""
    key = hashlib.sha256(f"{LLAMA_CPP_PYTHON} {args} {sys.version_info[:2]}".encode()).hexdigest()[:16]
    home = cache_dir() / "wheels" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}-{key}"
    found = sorted(home.glob("llama_cpp_python-*.whl"))
    if found:
        print(f"reader: using the wheel built earlier for these flags: {found[0]}")
        return found[0]
    print(f"reader: building llama-cpp-python {LLAMA_CPP_PYTHON} (about 5-10 min on 2 cores) with CMAKE_ARGS={args}")
    tmp = Path(tempfile.mkdtemp(prefix="qlora-reader-wheel-"))
    t0 = time.perf_counter()
    try:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python"]
        cmd += ["-q", "-w", str(tmp), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
        subprocess.run(cmd, check=True, env={**os.environ, "CMAKE_ARGS": args, "FORCE_CMAKE": "1"})
        wheel = next(tmp.glob("llama_cpp_python-*.whl"))
        home.mkdir(parents=True, exist_ok=True)
        dest = home / wheel.name
        shutil.move(wheel, home / (wheel.name + ".partial"))
        os.replace(home / (wheel.name + ".partial"), dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"reader: built in {time.perf_counter() - t0:.0f} s -> {dest}")
    return dest


def install(wheel: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)]
    subprocess.run(cmd, check=True)


def smoke() -> tuple[bool, str]:
    """Load the packaged GGUF in a child process; (ok, what it printed or why it failed)."""
    from qlora_pipeline.stages.lm.llama_reader import smoke_check

    try:
        info = smoke_check(embedded_gguf_path())
    except PipelineError as exc:
        return False, str(exc)
    return True, (
        f"llama-cpp-python {info['version']} loaded {embedded_gguf_path().name}, evaluated {info['tokens']} tokens "
        f"(vocab {info['n_vocab']}, next token {info['next_token']!r}); {info['system_info']}"
    )


def installed_from_our_cache() -> bool:
    """Is the installed llama-cpp-python one of our builds (not pip's native one)?"""
    from importlib import metadata

    try:
        dist = metadata.distribution("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return False
    origin = dist.read_text("direct_url.json") or ""
    return dist.version == LLAMA_CPP_PYTHON and str(cache_dir() / "wheels") in origin


def ensure_reader(cpu: str, force: bool = False) -> str:
    """Install a reader that was seen to run here; returns the smoke line. Raises PipelineError if none runs."""
    if not force and installed_from_our_cache():
        ok, line = smoke()
        if ok:
            return f"reader: already installed and working: {line}"
    tried = []
    for level in (cpu, BASELINE) if cpu != BASELINE else (cpu,):
        args = cmake_args(level)
        install(build_wheel(args))
        ok, line = smoke()
        if ok:
            return f"reader: smoke check passed ({level}): {line}"
        print(f"reader: the {level} build does not run here: {line}", file=sys.stderr)
        tried.append(level)
        if os.environ.get("QLORA_READER_CMAKE_ARGS"):
            break
    raise PipelineError(
        f"no llama.cpp build ran on this machine (tried {', '.join(tried)}); set QLORA_READER_CMAKE_ARGS to flags "
        "your CPU supports and run `make reader` again, or set QLORA_READER=off and export.score_gguf: false"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", default=os.environ.get("QLORA_READER_CPU", "auto"))
    parser.add_argument("--force", action="store_true", help="rebuild and reinstall even if a working one is there")
    args = parser.parse_args(argv)
    if os.environ.get("QLORA_READER", "").lower() == "off":
        print("reader: QLORA_READER=off, not installed; set export.score_gguf: false in params.yaml")
        return 0
    try:
        print(ensure_reader(args.cpu, force=args.force))
    except (PipelineError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
