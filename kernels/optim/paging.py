"""Paging of optimizer state between a host store and a bounded device working set.

Why not bitsandbytes' approach: bnb allocates paged state with ``cudaMallocManaged`` and leaves eviction to the
UVM driver. That hangs or fails on platforms without concurrent managed access (Windows/WSL/Jetson), cannot be
bounded by a byte budget, and bnb's ``load_state_dict`` turns paged state into plain device tensors.

Here every page is an explicit pair: a host copy (pinned on CUDA, so copies are truly async) and, while resident,
a device buffer. Pages are moved with ``copy_(non_blocking=True)`` on a side stream and ordered with events; the
device working set is kept under ``PagingConfig.budget_bytes`` by writing back and evicting least-recently-used
pages. A memory spike elsewhere therefore costs transfer time instead of an out-of-memory crash.

On CPU the very same code runs with the "device" being host memory: device buffers are separate CPU tensors and
copies are synchronous, so tests exercise page-in, write-back, eviction and the counters for real.

A page is an opaque ``uint8`` buffer; what lives in it (which state tensors, which element range) is decided by
the optimizer, which also guarantees that one page is self-contained for an update.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

_ALIGN = 256  # byte alignment of host slices, so fp32 views of page contents are always legal
_HOST_CHUNK_MIN = 1 << 20  # host store chunk sizes (pinned on CUDA), see _HostArena
_HOST_CHUNK_MAX = 64 << 20
MIN_PAGE_BYTES = 1024


def _align(n: int, a: int = _ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class PagingConfig:
    """How optimizer state is paged.

    ``budget_bytes``: most bytes of state resident on the device at once (``None``: no limit, pages stay
    resident after first use). ``page_bytes``: target size of one page; the unit of transfer and eviction.
    ``prefetch``: copy the next page in on the side stream while the current one updates.
    """

    budget_bytes: int | None = None
    page_bytes: int = 2 << 20
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.budget_bytes is not None and self.budget_bytes < 0:
            raise ValueError(f"PagingConfig.budget_bytes must be >= 0 or None, got {self.budget_bytes}")
        if self.page_bytes < MIN_PAGE_BYTES:
            raise ValueError(f"PagingConfig.page_bytes must be >= {MIN_PAGE_BYTES}, got {self.page_bytes}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PagingConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PagingConfig keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


@dataclass
class PagingStats:
    """Counters for tests and MLflow. Bytes are page bytes actually copied, not tensor sizes."""

    pages_in: int = 0  # host -> device copies (demand + prefetch)
    pages_out: int = 0  # device -> host write-backs of dirty pages
    bytes_in: int = 0
    bytes_out: int = 0
    evictions: int = 0  # pages dropped from the working set (clean or dirty)
    prefetches: int = 0  # page-ins issued ahead of use
    working_set_bytes: int = 0
    peak_working_set_bytes: int = 0
    total_bytes: int = 0  # bytes of all pages (host store size)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_in + self.bytes_out

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["bytes_moved"] = self.bytes_moved
        return d


class _HostArena:
    """Bump allocator of host slices. On CUDA the chunks are pinned so async copies overlap compute.

    Chunks grow geometrically (1 MiB doubling to 64 MiB): small optimizers stay small, big ones make few
    pinned allocations, and every chunk is a power of two (what the host caching allocator would round to).
    """

    def __init__(self, pin: bool) -> None:
        self._pin = pin
        self._chunk: torch.Tensor | None = None
        self._used = 0
        self._next = _HOST_CHUNK_MIN

    def alloc(self, nbytes: int) -> torch.Tensor:
        size = _align(max(nbytes, 1))
        if self._chunk is None or self._used + size > self._chunk.numel():
            chunk = self._next
            while chunk < size:
                chunk *= 2
            self._chunk = torch.zeros(chunk, dtype=torch.uint8, pin_memory=self._pin)
            self._used = 0
            self._next = min(max(self._next, chunk) * 2, _HOST_CHUNK_MAX)
        out = self._chunk[self._used : self._used + nbytes]
        self._used += size
        return out


class _Page:
    __slots__ = ("dev", "dirty", "host", "last_use", "nbytes", "pinned", "ready")

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host
        self.nbytes = host.numel()
        self.dev: torch.Tensor | None = None
        self.dirty = False
        self.pinned = False
        self.ready: torch.cuda.Event | None = None  # H2D copy done (side stream)
        self.last_use: torch.cuda.Event | None = None  # last update that touched it (compute stream)


class StateStore:
    """Pages of optimizer state that always live on the device (no paging). Same interface as the paged store,
    so the optimizer has a single code path and paged vs unpaged differ only in where bytes sit."""

    paged = False

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self._bufs: list[torch.Tensor] = []
        self.stats = PagingStats()

    def new_page(self, nbytes: int) -> int:
        self._bufs.append(torch.zeros(nbytes, dtype=torch.uint8, device=self.device))
        self.stats.total_bytes += nbytes
        self.stats.working_set_bytes += nbytes
        self.stats.peak_working_set_bytes = self.stats.working_set_bytes
        return len(self._bufs) - 1

    def acquire(self, pid: int) -> torch.Tensor:
        return self._bufs[pid]

    def release(self, pid: int, dirty: bool = True) -> None:
        pass

    def prefetch(self, pid: int) -> None:
        pass

    def read(self, pid: int) -> torch.Tensor:
        return self._bufs[pid].detach().to("cpu", copy=True)

    def write(self, pid: int, data: torch.Tensor) -> None:
        self._bufs[pid].copy_(data.reshape(-1).view(torch.uint8))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class PagedStateStore(StateStore):
    """Host-backed pages with an LRU device working set bounded by ``config.budget_bytes``.

    Protocol per update: ``acquire(pid)`` (demand page-in, pins the page, orders the compute stream after the
    copy), optionally ``prefetch(next_pid)``, launch the update on the current stream, ``release(pid)`` (unpins,
    marks dirty, records the last-use event that a later write-back waits on). At most one page is pinned at a
    time by the optimizer, so the working set never exceeds ``max(budget, one page)``.
    """

    paged = True

    def __init__(self, config: PagingConfig, device: torch.device) -> None:
        super().__init__(device)
        self.config = config
        self._pages: list[_Page] = []
        self._lru: OrderedDict[int, None] = OrderedDict()  # resident pages, least recently used first
        self._cuda = self.device.type == "cuda"
        self._host = _HostArena(pin=self._cuda)
        self._side = torch.cuda.Stream(device=self.device) if self._cuda else None

    # ---- allocation -------------------------------------------------------------------------------------
    def new_page(self, nbytes: int) -> int:
        self._pages.append(_Page(self._host.alloc(nbytes)))
        self.stats.total_bytes += nbytes
        return len(self._pages) - 1

    # ---- residency --------------------------------------------------------------------------------------
    def _fits(self, nbytes: int) -> bool:
        b = self.config.budget_bytes
        return b is None or self.stats.working_set_bytes + nbytes <= b

    def _make_room(self, nbytes: int) -> bool:
        """Evict unpinned pages, least recently used first, until ``nbytes`` more fit. False if they cannot."""
        if self._fits(nbytes):
            return True
        for pid in list(self._lru):
            if self._pages[pid].pinned:
                continue
            self._evict(pid)
            if self._fits(nbytes):
                return True
        return False

    def _page_in(self, pid: int) -> None:
        page = self._pages[pid]
        if self._cuda:
            cur = torch.cuda.current_stream(self.device)
            # Allocate on the compute stream (freed pages go back to the pool activations use), then let the
            # side stream wait for everything queued so far: the block may be recycled from a tensor that
            # pending compute still reads.
            buf = torch.empty(page.nbytes, dtype=torch.uint8, device=self.device)
            self._side.wait_stream(cur)
            with torch.cuda.stream(self._side):
                buf.copy_(page.host, non_blocking=True)
                page.ready = torch.cuda.Event()
                page.ready.record(self._side)
            buf.record_stream(self._side)
        else:
            buf = torch.empty(page.nbytes, dtype=torch.uint8, device=self.device)
            buf.copy_(page.host)
        page.dev = buf
        page.dirty = False
        self._lru[pid] = None
        s = self.stats
        s.pages_in += 1
        s.bytes_in += page.nbytes
        s.working_set_bytes += page.nbytes
        s.peak_working_set_bytes = max(s.peak_working_set_bytes, s.working_set_bytes)

    def _write_back(self, page: _Page) -> None:
        assert page.dev is not None
        if self._cuda:
            if page.last_use is not None:
                self._side.wait_event(page.last_use)
            with torch.cuda.stream(self._side):
                page.host.copy_(page.dev, non_blocking=True)
            page.dev.record_stream(self._side)
        else:
            page.host.copy_(page.dev)
        page.dirty = False
        self.stats.pages_out += 1
        self.stats.bytes_out += page.nbytes

    def _evict(self, pid: int, write_back: bool = True) -> None:
        page = self._pages[pid]
        if page.dirty and write_back:
            self._write_back(page)
        page.dev = None
        page.dirty = False
        page.ready = None
        page.last_use = None
        del self._lru[pid]
        self.stats.working_set_bytes -= page.nbytes
        if write_back:
            self.stats.evictions += 1

    def acquire(self, pid: int) -> torch.Tensor:
        page = self._pages[pid]
        if page.dev is None:
            self._make_room(page.nbytes)  # if it cannot, run over budget by this one page rather than fail
            self._page_in(pid)
        if self._cuda and page.ready is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(page.ready)
            page.dev.record_stream(cur)
            page.ready = None
        page.pinned = True
        self._lru.move_to_end(pid)
        return page.dev

    def release(self, pid: int, dirty: bool = True) -> None:
        page = self._pages[pid]
        page.pinned = False
        page.dirty = page.dirty or dirty
        if self._cuda:
            page.last_use = torch.cuda.current_stream(self.device).record_event()

    def prefetch(self, pid: int) -> None:
        page = self._pages[pid]
        if not self.config.prefetch or page.dev is not None:
            return
        if not self._make_room(page.nbytes):
            return  # the budget cannot hold it next to the pinned page: it will be demand-paged
        self._page_in(pid)
        self.stats.prefetches += 1

    # ---- consistency -------------------------------------------------------------------------------------
    def synchronize(self) -> None:
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self._side.synchronize()

    def read(self, pid: int) -> torch.Tensor:
        """A CPU copy of the page's current bytes (resident copy if it is newer)."""
        page = self._pages[pid]
        self.synchronize()
        src = page.dev if (page.dev is not None and page.dirty) else page.host
        return src.detach().to("cpu", copy=True)

    def write(self, pid: int, data: torch.Tensor) -> None:
        """Replace a page's bytes (used by ``load_state_dict``); a resident copy is dropped, not written back."""
        page = self._pages[pid]
        self.synchronize()
        if page.dev is not None:
            self._evict(pid, write_back=False)
        page.host.copy_(data.reshape(-1).view(torch.uint8))

    def evict_all(self) -> None:
        """Write back and drop every unpinned resident page (e.g. before evaluation or a big allocation)."""
        for pid in list(self._lru):
            if not self._pages[pid].pinned:
                self._evict(pid)
        self.synchronize()

    def set_budget(self, budget_bytes: int | None) -> None:
        """Change the budget at run time; shrinking it evicts immediately."""
        self.config = PagingConfig(budget_bytes, self.config.page_bytes, self.config.prefetch)
        self._make_room(0)
        self.synchronize()
