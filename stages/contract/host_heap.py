"""How the C heap of a CPU process gives freed tensor memory back (:func:`bound_host_heap`).

Why: torch allocates CPU tensors with the C library's ``malloc``. glibc serves a request above its *mmap threshold*
from a mapping of its own, returned to the system when freed, and smaller ones from a heap whose freed gaps stay
resident until a later request of a fitting size reuses them. The threshold starts at 128 KiB and, by default, rises
to the size of every larger mapping that is freed (up to 32 MiB), so after the first few training steps nearly
every activation is carved from the heap, and a step's tensors of a hundred different sizes leave it full of gaps.
Measured on SmolLM2 training on the 2-core AVX2 VM (fp32, batches of 8 padded examples, 8 steps): the heap held
700-1,000 MB of freed memory between steps against 223 MB in use, and peak RSS was 3,027 MB. With the threshold
held at 4 MiB (and the heap's top kept up to 64 MiB, so it is not shrunk and regrown each step) peak RSS was
2,478 MB at the same step time (4.03 s both). Lower thresholds cut more (1 MiB: 2,168 MB; 128 KiB: 1,860 MB) but
every smaller tensor then costs a fresh mapping and its page faults: 5.32 s and 6.05 s a step (docs/speed.md).

A freed model is a different case: its tensors were carved from the heap, and what it leaves is resident until
something of a fitting size reuses it, while the next model's tensors have other sizes. :func:`return_freed_heap`
hands it back where a stage swaps one model for another. Measured on the AVX2 VM, SmolLM2, small params: train,
before the 16-bit LoRA baseline, RSS at the handover 1,073 -> 624 MB and the stage's peak 1,841 -> 1,722 MB;
evaluate, between its variants, peak 1,601 and 1,689 -> 1,259 and 1,362 MB at the same time (docs/speed.md).

The bound is a process-wide setting, so the CLI, the flow and train's model builder apply it; one the user set
through glibc's environment variables (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, a ``glibc.malloc``
tunable) stays theirs. Other C libraries (musl, macOS) are left alone. Where the CLI runs on mimalloc
(host_allocator.py: peak RSS a fifth lower again) glibc's malloc serves nothing and the bound does nothing; it still
holds in processes on the system allocator (a library user's own, a Prefect worker's flow run, the tests).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
"""glibc's mallopt parameter numbers (malloc.h)."""
M_MMAP_THRESHOLD = -3
HOST_MMAP_THRESHOLD = 4 * 2**20
"""Requests of at least this many bytes get a mapping of their own, returned to the system when freed."""
HOST_TRIM_THRESHOLD = 64 * 2**20
"""Free memory at the heap's top kept for the next step rather than returned."""
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def uses_glibc() -> bool:
    """Whether this process's C library is glibc (whose mallopt parameters the constants above name)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def bound_host_heap() -> bool:
    """Hold glibc's mmap threshold at :data:`HOST_MMAP_THRESHOLD` and its trim threshold at
    :data:`HOST_TRIM_THRESHOLD` for this process; returns whether it did (False: not glibc, or the user's
    environment already tunes malloc). Setting either also stops glibc from raising them on its own."""
    user_set = any(os.environ.get(name) for name in USER_SETTINGS) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    )
    if user_set or not uses_glibc():
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, HOST_TRIM_THRESHOLD)
    )


def return_freed_heap() -> bool:
    """Give the heap's free pages back to the system after a model was dropped, so the next one is not stacked on
    the last one's gaps: glibc's ``malloc_trim(0)``, or on mimalloc (host_allocator.py) ``mi_collect(true)``, which
    decommits the freed pages now rather than after its delay. Collects garbage first, so the dropped model is
    freed. Returns whether it asked the allocator (False off glibc and mimalloc)."""
    import gc

    gc.collect()
    process = ctypes.CDLL(None)
    collect = getattr(process, "mi_collect", None)
    if collect is not None:
        collect.argtypes = [ctypes.c_bool]
        collect(True)
        return True
    if not uses_glibc():
        return False
    return bool(process.malloc_trim(0))
