"""Native readers run in a child process with a time limit, so their crash or hang is one line, not ours.

A reader such as llama.cpp is a native library built on the machine it runs on; a build that uses an
instruction the CPU or the OS does not grant (AMX tile state, AVX-512 on an older CPU) dies with SIGSEGV or
SIGILL inside the process that loaded it. Loaded in the pipeline's own process it would take the stage, the
Prefect flow, the CLI or the test runner down with it, with no message and a half-written artifact. Here the
parent writes a JSON payload into a scratch folder, starts
``python -m qlora_pipeline.stages.contract.isolation TARGET DIR`` in its own process group, waits at most
``timeout_s``, and turns every failure into a :class:`ReaderFailed` that names the file, the reader and the signal or
cause.

A target is ``"package.module:function"``; the function takes the payload dict and returns a JSON-serialisable
dict whose numpy arrays travel as ``.npy`` files beside it. Targets import their native library themselves, so
the parent never does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

from qlora_pipeline.stages.contract.errors import PipelineError
from qlora_pipeline.stages.contract.runtime import REPO_ROOT

MISSING_EXIT = 3
"""The child's exit code when the reader's Python package is not installed."""
_RESULT, _PAYLOAD, _ERROR = "result.json", "payload.json", "error.json"


class ReaderFailed(PipelineError):
    """A native reader crashed, hung, raised or is not installed; the message says which and what to do."""


@dataclass(frozen=True)
class Reader:
    """Who reads (for messages) and how to get it back when it fails."""

    name: str
    """e.g. 'llama.cpp (llama-cpp-python)'."""
    fix: str
    """What the user does when the reader crashes or is missing."""


def call_reader(
    reader: Reader, target: str, payload: dict[str, Any], subject: Path | str, timeout_s: float
) -> dict[str, Any]:
    """Run ``target(payload)`` in a child process and return its result; raise ReaderFailed on any failure."""
    work = Path(tempfile.mkdtemp(prefix="qlora-reader-"))
    try:
        (work / _PAYLOAD).write_text(json.dumps(payload))
        cmd = [sys.executable, "-m", "qlora_pipeline.stages.contract.isolation", target, str(work)]
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ReaderFailed(
                f"{reader.name} did not finish reading {subject} within {timeout_s:g} s (killed); {reader.fix}"
            ) from None
        tail = _last_line(err.decode(errors="replace"))
        if proc.returncode < 0:
            raise ReaderFailed(
                f"{reader.name} crashed with {_signal_name(-proc.returncode)} while reading {subject}; {reader.fix}"
            )
        if proc.returncode == MISSING_EXIT:
            cause = json.loads((work / _ERROR).read_text()).get("error", tail) if (work / _ERROR).exists() else tail
            raise ReaderFailed(f"{reader.name} is not installed ({cause}), needed to read {subject}; {reader.fix}")
        if proc.returncode != 0:
            cause = json.loads((work / _ERROR).read_text())["error"] if (work / _ERROR).exists() else tail
            raise ReaderFailed(f"{reader.name} failed on {subject} (exit {proc.returncode}: {cause}); {reader.fix}")
        return _load_result(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (a reader may have started threads or helpers)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _load_result(work: Path) -> dict[str, Any]:
    result = json.loads((work / _RESULT).read_text())
    arrays = result.pop("__arrays__", [])
    if arrays:
        import numpy as np

        for key in arrays:
            result[key] = np.load(work / f"{key}.npy")
    return result


def _child(target: str, work: Path) -> int:
    """Child side: call the target, write result.json (+ .npy arrays) or error.json; the exit code says which."""
    module_name, _, func_name = target.partition(":")
    payload = json.loads((work / _PAYLOAD).read_text())
    try:
        result = getattr(import_module(module_name), func_name)(payload)
    except ImportError as exc:  # the reader's package (or a library it needs) is absent
        (work / _ERROR).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return MISSING_EXIT
    except Exception as exc:  # any reader-side error becomes one line in the parent
        (work / _ERROR).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}))
        return 1
    arrays = [k for k, v in result.items() if hasattr(v, "__array__") and not isinstance(v, (int, float))]
    if arrays:
        import numpy as np

        for key in arrays:
            np.save(work / f"{key}.npy", np.asarray(result.pop(key)))
        result["__arrays__"] = arrays
    (work / _RESULT).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1], Path(sys.argv[2])))
