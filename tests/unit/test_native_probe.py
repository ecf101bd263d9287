"""The child-process probe every native piece goes through (stages/contract/native_probe.py): how a child's end
becomes a verdict, and a verdict kept whole per machine."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipeline.stages.contract.native_probe import (
    Verdict,
    keep_verdict,
    native_build_key,
    read_verdict,
    run_probe,
)


def _probe(code: str, timeout_s: float = 60) -> Verdict:
    return run_probe(code, ["an-arg"], passed_line="probe ok", ok_reason="it ran", timeout_s=timeout_s)


def test_a_child_that_prints_the_line_passes_and_gets_its_arguments() -> None:
    assert _probe("import sys; print('noise'); print('probe ok' if sys.argv[1] == 'an-arg' else 'no')") == Verdict(
        True, "it ran"
    )


def test_each_way_a_child_can_fail_is_named() -> None:
    said = _probe("print('probe failed: masks differ')")  # exit 0, its own line
    assert said == Verdict(False, "the probe exited 0: probe failed: masks differ")
    raised = _probe("print('probe ok'); raise ValueError('bad build')")  # the line, then a traceback
    assert raised == Verdict(False, "the probe exited 1: ValueError: bad build")
    crashed = _probe("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert crashed == Verdict(False, "the probe died of SIGSEGV")
    silent = _probe("import sys; sys.exit(3)")
    assert silent == Verdict(False, "the probe exited 3: no output")
    hung = _probe("import time; time.sleep(30)", timeout_s=0.5)
    assert hung == Verdict(False, "the probe did not finish in 0.5 s")


def test_a_verdict_is_kept_whole_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "verdict.json"
    assert read_verdict(path) is None
    keep_verdict(path, Verdict(False, "the probe died of SIGILL"))
    assert read_verdict(path) == Verdict(False, "the probe died of SIGILL")
    assert [p.name for p in path.parent.iterdir()] == ["verdict.json"], "no partial file is left beside it"
    path.write_text(json.dumps({"ok": True}))  # from another version of the code: probe again
    assert read_verdict(path) is None


def test_the_key_changes_with_the_library_and_the_extras(tmp_path: Path) -> None:
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"one build")
    first = native_build_key([lib], "torch 2.13")
    assert native_build_key([lib], "torch 2.13") == first
    assert native_build_key([lib], "torch 2.11") != first
    lib.write_bytes(b"another build")
    assert native_build_key([lib], "torch 2.13") != first
