"""The CLI's C allocator (stages/contract/host_allocator.py): preloaded only once a child process has run torch on it
here, a crash in that child never reaches the pipeline, and the processes the pipeline starts keep the system's."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_pipeline.stages.contract import host_allocator
from qlora_pipeline.stages.contract.errors import InputError
from qlora_pipeline.stages.contract.host_allocator import (
    CHOICE_VAR,
    LIBRARY_VAR,
    SAVED_PRELOAD_VAR,
    Verdict,
    allocator_in_use,
    mimalloc_library,
    preload_env,
    run_on_host_allocator,
    verdict_for,
)
from qlora_pipeline.stages.contract.host_heap import uses_glibc
from qlora_pipeline.stages.contract.runtime import REPO_ROOT

pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and uses_glibc()), reason="the allocator is preloaded on Linux with glibc only"
)
IN_USE = "from qlora_pipeline.stages.contract.host_allocator import allocator_in_use; print(allocator_in_use())"


@pytest.fixture
def library() -> Path:
    found = mimalloc_library()
    assert found is not None, "cmeel-mimalloc is a dependency on Linux: its library must be installed"
    return found


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment of this process's own, with a cache of its own (so every verdict here is probed afresh)."""
    for name in (CHOICE_VAR, LIBRARY_VAR, SAVED_PRELOAD_VAR, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QLORA_CACHE_DIR", str(tmp_path / "cache"))
    return dict(os.environ)


def _in_use(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", IN_USE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_probed_library_is_preloaded_and_keeps_its_verdict(clean_env, library, monkeypatch) -> None:
    env = preload_env(clean_env)
    assert env is not None
    assert env["LD_PRELOAD"] == str(library) and env["MIMALLOC_ALLOW_THP"] == "0"
    assert _in_use(env) == "mimalloc" and _in_use(clean_env) == "system"
    assert allocator_in_use() == "system"  # pytest's own process was started without it

    def no_second_probe(_library: Path) -> Verdict:
        raise AssertionError("the verdict was probed again")

    monkeypatch.setattr(host_allocator, "probe", no_second_probe)
    assert verdict_for(library).ok
    assert preload_env({**clean_env, CHOICE_VAR: "system"}) is None
    assert preload_env({**clean_env, "LD_PRELOAD": str(library)}) is None  # preloaded already


def test_a_probe_that_crashes_leaves_the_system_allocator(clean_env, library, monkeypatch, caplog) -> None:
    monkeypatch.setattr(host_allocator, "PROBE_CODE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with caplog.at_level(logging.WARNING):
        assert preload_env(clean_env) is None
    assert "died of SIGSEGV" in caplog.text and str(library) in caplog.text
    with pytest.raises(InputError, match=r"QLORA_HOST_ALLOCATOR=mimalloc, but .* failed its probe"):
        preload_env({**clean_env, CHOICE_VAR: "mimalloc"})
    with pytest.raises(InputError, match="is not one of auto, system, mimalloc"):
        preload_env({**clean_env, CHOICE_VAR: "jemalloc"})


def test_the_command_reexecutes_once_and_its_children_get_the_environment_back(clean_env, monkeypatch) -> None:
    calls: list[tuple[str, list[str], dict[str, str]]] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))

    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.setenv("LD_PRELOAD", "libfaketime.so")
    run_on_host_allocator()
    ((path, argv, env),) = calls
    assert path == sys.executable and argv == sys.orig_argv
    assert env["LD_PRELOAD"].endswith("libmimalloc.so.3:libfaketime.so") and env[SAVED_PRELOAD_VAR] == "libfaketime.so"

    # the re-executed process: the loader preloaded mimalloc; what it starts gets the LD_PRELOAD it was started from
    monkeypatch.setenv(SAVED_PRELOAD_VAR, "libfaketime.so")
    monkeypatch.setenv("LD_PRELOAD", env["LD_PRELOAD"])
    run_on_host_allocator()
    assert os.environ["LD_PRELOAD"] == "libfaketime.so" and SAVED_PRELOAD_VAR not in os.environ
    assert len(calls) == 1


def test_the_cli_runs_on_without_a_library_that_fails(clean_env, tmp_path: Path) -> None:
    """A file the loader cannot preload: one warning line and the command's own result; required, exit 2."""
    not_a_library = tmp_path / "libmimalloc.so.3"
    not_a_library.write_text("not an ELF file")
    params = REPO_ROOT / "params.yaml"
    cmd = [sys.executable, "-m", "qlora_pipeline.pipelines.cli", "check-params", "-p", str(params)]
    env = {**clean_env, LIBRARY_VAR: str(not_a_library)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and f"{params}: ok" in done.stdout, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "running on the system allocator" in lines[0] and "failed its probe" in lines[0]
    required = subprocess.run(cmd, env={**env, CHOICE_VAR: "mimalloc"}, capture_output=True, text=True, timeout=300)
    assert required.returncode == 2 and required.stderr.startswith("error: QLORA_HOST_ALLOCATOR=mimalloc"), required
