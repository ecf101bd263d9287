"""The bounded C heap (stages/contract/host_heap.py): memory of freed tensors goes back to the system, where glibc's
default keeps it resident, with the bound or when a stage drops a model, and malloc settings the user made stay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qlora_pipeline.stages.contract.host_heap import USER_SETTINGS, bound_host_heap, uses_glibc

_RETAINED = """
import os, sys
import torch
if sys.argv[1] == "bounded":
    from qlora_pipeline.stages.contract.host_heap import bound_host_heap
    assert bound_host_heap()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
big = torch.ones(8 * 2**18)  # an 8 MiB mapping, freed: by default glibc serves everything up to 8 MiB from its heap
del big
before = rss_mb()
blocks, pins = [], []
for _ in range(40):  # 6 MiB tensors (activation-sized), each followed by a small one still alive after them
    blocks.append(torch.ones(6 * 2**18))
    pins.append(torch.ones(2**16))
del blocks
if sys.argv[1] == "returned":  # glibc's default, then the freed heap handed back
    from qlora_pipeline.stages.contract.host_heap import return_freed_heap
    assert return_freed_heap()
print(rss_mb() - before)
"""
FREED_MB = 40 * 6


def _retained_mb(mode: str, preload: dict[str, str] | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in (*USER_SETTINGS, "GLIBC_TUNABLES")} | (preload or {})
    out = subprocess.run([sys.executable, "-c", _RETAINED, mode], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


GLIBC_ON_LINUX = pytest.mark.skipif(
    not uses_glibc() or not os.path.exists("/proc/self/statm"), reason="glibc on Linux only"
)


@pytest.fixture(scope="module")
def default_retained_mb() -> float:
    default = _retained_mb("default")
    assert default > 0.8 * FREED_MB, f"glibc's default kept only {default:.0f} of {FREED_MB} MB: the premise fails"
    return default


@GLIBC_ON_LINUX
def test_freed_activation_sized_tensors_leave_the_process(default_retained_mb: float) -> None:
    bounded = _retained_mb("bounded")
    assert bounded < 0.2 * FREED_MB, (bounded, default_retained_mb)


@GLIBC_ON_LINUX
def test_a_dropped_models_heap_goes_back_when_asked(default_retained_mb: float) -> None:
    returned = _retained_mb("returned")
    assert returned < 0.2 * FREED_MB, (returned, default_retained_mb)


@GLIBC_ON_LINUX
def test_on_mimalloc_freed_pages_stay_a_while_and_go_back_when_asked() -> None:
    """mimalloc (host_allocator.py) decommits freed pages after a delay; at a model handover they go back now."""
    from qlora_pipeline.stages.contract.host_allocator import MIMALLOC_SETTINGS, mimalloc_library

    library = mimalloc_library()
    assert library is not None, "cmeel-mimalloc is a dependency on Linux"
    preload = {"LD_PRELOAD": str(library), **MIMALLOC_SETTINGS}
    kept = _retained_mb("default", preload)
    assert kept > 0.5 * FREED_MB, f"mimalloc kept only {kept:.0f} of {FREED_MB} MB at once: the premise fails"
    returned = _retained_mb("returned", preload)
    assert returned < 0.2 * FREED_MB, (returned, kept)


def test_malloc_settings_the_user_made_stay(monkeypatch) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert bound_host_heap() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")
    assert bound_host_heap() is False
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")  # tunes something else: ours applies
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert bound_host_heap() is uses_glibc()
