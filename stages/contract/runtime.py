"""Facts about the run: code version, library versions, wall time and peak memory of a stage."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

LIBRARIES = (
    "torch",
    "triton",
    "transformers",
    "datasets",
    "safetensors",
    "tokenizers",
    "prefect",
    "mlflow",
    "dvc",
    "gguf",
    "numpy",
    "pydantic",
    "cmeel-mimalloc",
)


NOT_CODE = ("params.yaml", "dvc.lock", "metrics")
CODE_DIRS = ("stages", "kernels", "pipelines")
"""Where a file git does not track yet is code that would ship unrecorded (a new module imported by a stage)."""


def code_version(root: Path | None = None) -> dict[str, Any]:
    """git commit and dirty flag of the checkout; an auditor needs both to trust a number.

    Dirty: a tracked file differs from the commit (params.yaml, dvc.lock and metrics/ excepted: they change with
    every run and the lineage records them itself), or an untracked, unignored file sits in a code folder.
    """
    root = REPO_ROOT if root is None else root

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=all", "--", ".", *(f":!{p}" for p in NOT_CODE))
    if status is None:
        return {"commit": commit, "dirty": None}
    changed = [ln for ln in status.splitlines() if ln.strip()]
    dirty = any(
        not ln.startswith("??") or ln[3:].strip('"').startswith(tuple(f"{d}/" for d in CODE_DIRS)) for ln in changed
    )
    return {"commit": commit, "dirty": dirty}


def library_versions() -> dict[str, str]:
    """The packages' versions, the C allocator this process runs on (what its memory figures depend on) and where
    its CPU dropout masks and 8-bit AdamW steps come from (what its step times depend on)."""
    from qlora_pipeline.kernels import dropout_cpu
    from qlora_pipeline.kernels.optim import adamw8bit_cpu
    from qlora_pipeline.stages.contract.host_allocator import allocator_in_use

    out = {
        "host_allocator": allocator_in_use(),
        "cpu_dropout_masks": "compiled" if dropout_cpu.compiled_in_use() else "torch",
        "cpu_adamw8bit": "compiled" if adamw8bit_cpu.compiled_in_use() else "torch",
    }
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StageMeter:
    """Wall time and memory peaks of one stage (CPU: sampled RSS; GPU: torch's allocator peaks)."""

    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0
    cuda: dict[str, float] = field(default_factory=dict)

    def as_memory(self) -> dict[str, float]:
        mem = {"peak_rss_mb": round(self.peak_rss_mb, 1), "start_rss_mb": round(self.start_rss_mb, 1)}
        mem.update(self.cuda)
        return mem


@contextlib.contextmanager
def measure(device: str = "cpu", interval_s: float = 0.05) -> Iterator[StageMeter]:
    """Sample RSS in a thread while the block runs (ru_maxrss would give the process peak, not the stage's);
    on a CUDA device also the allocator's peaks over the block."""
    meter = StageMeter()
    start_rss = _rss_bytes()
    peak = [start_rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], _rss_bytes())

    on_device = device != "cpu"
    if on_device:
        from qlora_pipeline.stages.contract.device import reset_peak_memory

        reset_peak_memory(device)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        yield meter
    finally:
        meter.wall_s = time.perf_counter() - t0
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        meter.peak_rss_mb = peak[0] / 2**20
        meter.start_rss_mb = start_rss / 2**20
        if on_device:
            from qlora_pipeline.stages.contract.device import peak_memory_mb

            meter.cuda = peak_memory_mb(device)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
