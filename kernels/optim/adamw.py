"""AdamW with 32-bit or 8-bit blockwise state, optionally paged (see ``paging.py``): the state's layout in pages,
its checkpoints, and the step's order over them. The update's numerics, and how they differ from bitsandbytes',
live in ``adamw_math.py``.

The step updates several small tensors in one call (up to ``adamw_math.BATCH_ELEMENTS`` elements) where their pages
may all be resident at once: without paging, or paged without a budget. Under a budget one page is pinned at a time,
so each is updated alone. Either way the bits are the same.

* paging: bnb pages only tensors >= 1e5 elements through CUDA managed memory and loses paging on
  ``load_state_dict``; we page every state tensor explicitly and keep paging across save/load.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any, Literal

import torch

from qlora_pipeline.kernels.dynamic_map import dequantize_blockwise
from qlora_pipeline.kernels.optim.adam_scalars import AdamScalars
from qlora_pipeline.kernels.optim.adamw_math import (
    BATCH_ELEMENTS,
    QuantMaps,
    State8bit,
    adamw8bit_update_many,
    adamw32_update_many,
)
from qlora_pipeline.kernels.optim.paging import PagedStateStore, PagingConfig, StateStore

_KEYS32 = ("exp_avg", "exp_avg_sq")
_KEYS8 = ("state1", "state2", "absmax1", "absmax2")


# ---- state layout -----------------------------------------------------------------------------------------------
def _align16(n: int) -> int:
    return -(-n // 16) * 16


def _segment_nbytes(bits: int, n: int, blocksize: int) -> int:
    if bits == 32:
        return 8 * n
    return _align16(2 * n) + 8 * (-(-n // blocksize))


def _segment_views(buf: torch.Tensor, bits: int, n: int, blocksize: int) -> dict[str, torch.Tensor]:
    """Views of one page: ``[m fp32 | v fp32]`` or ``[q1 | q2 | pad | absmax1 | absmax2]``."""
    if bits == 32:
        return {"exp_avg": buf[: 4 * n].view(torch.float32), "exp_avg_sq": buf[4 * n : 8 * n].view(torch.float32)}
    nb = -(-n // blocksize)
    o = _align16(2 * n)
    return {
        "state1": buf[:n],
        "state2": buf[n : 2 * n],
        "absmax1": buf[o : o + 4 * nb].view(torch.float32),
        "absmax2": buf[o + 4 * nb : o + 8 * nb].view(torch.float32),
    }


def _segment_elems(bits: int, n: int, blocksize: int, page_bytes: int | None) -> int:
    """Elements per page: whole param unpaged; else as many whole blocks (8-bit) / 256-element runs (32-bit)
    as fit in ``page_bytes``, so every page is self-contained for the update and block-aligned."""
    if page_bytes is None:
        return max(n, 1)
    if bits == 32:
        return max(256, page_bytes // 8 // 256 * 256)
    per_block = 2 * blocksize + 8
    return max(1, page_bytes // per_block) * blocksize


@dataclass(frozen=True)
class _Segment:
    start: int
    stop: int
    page: int


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2-sharded (DTensor) parameter or gradient; the tensor itself otherwise. The
    update is elementwise, so each rank steps its own shard and keeps that shard's state."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


@dataclass(frozen=True)
class _Update:
    """One segment's update in a step: its parameter, gradient and state, and its page, acquired."""

    group: dict[str, Any]
    p: torch.Tensor
    g: torch.Tensor
    state: dict[str, Any]
    seg: _Segment
    buf: torch.Tensor
    store: StateStore


def _budgeted(store: StateStore) -> bool:
    return isinstance(store, PagedStateStore) and store.config.budget_bytes is not None


def _run_key(group: dict[str, Any], p: torch.Tensor, g: torch.Tensor, state: dict[str, Any]) -> tuple:
    """What the segments updated in one call share: group, state width, step and blocksize, device and dtypes."""
    return (id(group), state["bits"], state["step"], state["blocksize"], p.device, p.dtype, g.dtype)


def _grouped_by_run(work: list[tuple]) -> list[tuple]:
    """`work` reordered so that segments of one run key follow each other (first appearance order kept)."""
    runs: dict[tuple, list[tuple]] = {}
    for item in work:
        group, p, g, state, _ = item
        runs.setdefault(_run_key(group, p, g, state), []).append(item)
    return [item for items in runs.values() for item in items]


def _same_run(run: list[_Update], u: _Update) -> bool:
    """Whether `u` can be updated in the same call as `run` (:func:`_run_key`)."""
    r = run[0]
    return _run_key(r.group, r.p, r.g, r.state) == _run_key(u.group, u.p, u.g, u.state)


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with 32-bit or 8-bit blockwise state and optional explicit paging.

    ``state_bits``, ``min_8bit_size`` and ``blocksize`` are per-group hyperparameters (defaults below);
    ``paging=None`` keeps state resident on the parameter's device. Per-parameter step counters, torch-style
    bias correction. ``state_dict()`` returns CPU tensors (torch keys ``exp_avg``/``exp_avg_sq`` for 32-bit,
    bnb keys ``state1``/``state2``/``absmax1``/``absmax2`` for 8-bit) plus the paging config, and
    ``load_state_dict`` restores all of it, paged again if paging is on, so a resume continues bit-identically.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_bits: Literal[32, 8] = 32,
        min_8bit_size: int = 4096,
        blocksize: int = 256,
        paging: PagingConfig | None = None,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}; must be >= 0")
        if eps < 0:
            raise ValueError(f"invalid eps {eps}; must be >= 0")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"invalid betas {betas}; need two values in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}; must be >= 0")
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits}")
        if blocksize < 16 or blocksize > 4096 or blocksize & (blocksize - 1):
            raise ValueError(f"blocksize must be a power of two in [16, 4096], got {blocksize}")
        if paging is not None and not isinstance(paging, PagingConfig):
            raise TypeError(f"paging must be a PagingConfig or None, got {type(paging).__name__}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            state_bits=state_bits,
            min_8bit_size=min_8bit_size,
            blocksize=blocksize,
        )
        super().__init__(params, defaults)
        self._paging = paging
        self._stores: dict[torch.device, StateStore] = {}
        self._maps: dict[torch.device, QuantMaps] = {}

    # ---- plumbing ----------------------------------------------------------------------------------------------
    @property
    def paging(self) -> PagingConfig | None:
        return self._paging

    def _store(self, device: torch.device) -> StateStore:
        store = self._stores.get(device)
        if store is None:
            store = PagedStateStore(self._paging, device) if self._paging else StateStore(device)
            self._stores[device] = store
        return store

    def _quant_maps(self, device: torch.device) -> QuantMaps:
        if device not in self._maps:
            self._maps[device] = QuantMaps.create(device)
        return self._maps[device]

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], bits: int | None = None) -> dict[str, Any]:
        n = local_shard(p).numel()
        bs = group["blocksize"]
        if bits is None:
            bits = 8 if group["state_bits"] == 8 and n >= group["min_8bit_size"] else 32
        page_bytes = self._paging.page_bytes if self._paging else None
        per = _segment_elems(bits, n, bs, page_bytes)
        store = self._store(p.device)
        segs = []
        for start in range(0, max(n, 1), per):
            stop = min(start + per, n)
            segs.append(_Segment(start, stop, store.new_page(_segment_nbytes(bits, stop - start, bs))))
        state = self.state[p]
        state.clear()
        state.update(step=0, bits=bits, blocksize=bs, segments=segs)
        return state

    # ---- the step ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One AdamW step. Pages are acquired just before their update; the next one is prefetched meanwhile."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, dict[str, Any], _Segment]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                if not local_shard(p.data).is_contiguous():
                    p.data = p.data.contiguous()
                state = self.state[p] or self._init_state(p, group)
                state["step"] += 1
                g = local_shard(p.grad.detach()).contiguous()
                work.extend((group, p, g, state, seg) for seg in state["segments"])
        if not any(_budgeted(self._store(item[1].device)) for item in work):
            work = _grouped_by_run(work)  # pages all stay resident: update order is free, and runs get long
        run: list[_Update] = []
        run_elements = 0
        for i, (group, p, g, state, seg) in enumerate(work):
            store = self._store(p.device)
            update = _Update(group, p, g, state, seg, store.acquire(seg.page), store)
            if i + 1 < len(work):
                nxt = work[i + 1]
                self._store(nxt[1].device).prefetch(nxt[4].page)
            if run and not _same_run(run, update):
                self._update_run(run)
                run, run_elements = [], 0
            run.append(update)
            run_elements += seg.stop - seg.start
            if _budgeted(store) or run_elements >= BATCH_ELEMENTS:
                self._update_run(run)  # under a budget, a page is released before the next one is acquired
                run, run_elements = [], 0
        if run:
            self._update_run(run)
        return loss

    def _update_run(self, run: list[_Update]) -> None:
        """One call of the update over the segments of `run` (same group, step, width, device and dtypes), then
        their pages released."""
        first = run[0]
        group, state = first.group, first.state
        lr, betas, eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        bits, bs = state["bits"], state["blocksize"]
        flat = [
            (local_shard(u.p.data).view(-1)[u.seg.start : u.seg.stop], u.g.view(-1)[u.seg.start : u.seg.stop])
            for u in run
        ]
        views = [_segment_views(u.buf, bits, u.seg.stop - u.seg.start, bs) for u in run]
        if bits == 32:
            ps, gs = [f[0] for f in flat], [f[1] for f in flat]
            ms, vs = [v["exp_avg"] for v in views], [v["exp_avg_sq"] for v in views]
            adamw32_update_many(ps, gs, ms, vs, lr, betas, eps, wd, state["step"])
        else:
            s = AdamScalars.make(lr, betas, eps, wd, state["step"])
            states = [State8bit(pf, gf, *(v[k] for k in _KEYS8)) for (pf, gf), v in zip(flat, views, strict=True)]
            adamw8bit_update_many(states, self._quant_maps(first.p.device), s, bs)
        for u in run:
            u.store.release(u.seg.page)

    # ---- inspection --------------------------------------------------------------------------------------------
    def get_state(self, p: torch.Tensor) -> dict[str, Any]:
        """CPU copies of ``p``'s state in state_dict form (``step`` + 32-bit or 8-bit tensors), {} if none yet."""
        state = self.state.get(p)
        if not state:
            return {}
        store = self._store(p.device)
        bits, bs = state["bits"], state["blocksize"]
        parts = [_segment_views(store.read(s.page), bits, s.stop - s.start, bs) for s in state["segments"]]
        keys = _KEYS32 if bits == 32 else _KEYS8
        out: dict[str, Any] = {"step": torch.tensor(float(state["step"]))}
        for k in keys:
            t = torch.cat([d[k] for d in parts]) if parts else torch.empty(0)
            out[k] = t.reshape(local_shard(p).shape) if k in ("exp_avg", "exp_avg_sq", "state1", "state2") else t
        return out

    def dequantized_state(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) in fp32 on CPU, whatever the state width: for comparisons and diagnostics."""
        st = self.get_state(p)
        if "exp_avg" in st:
            return st["exp_avg"], st["exp_avg_sq"]
        maps = self._quant_maps(torch.device("cpu"))
        bs = self.state[p]["blocksize"]
        m = dequantize_blockwise(st["state1"], st["absmax1"], maps.code1, bs)
        v = dequantize_blockwise(st["state2"], st["absmax2"], maps.code2, bs)
        return m, v

    def paging_stats(self) -> dict[str, int]:
        """Counters summed over devices (pages_in/out, bytes_in/out/moved, evictions, prefetches,
        working_set_bytes, peak_working_set_bytes, total_bytes). All zero-traffic when paging is off."""
        total: dict[str, int] = defaultdict(int)
        for store in self._stores.values():
            for k, v in store.stats.as_dict().items():
                total[k] += v
        return dict(total)

    def evict_all(self) -> None:
        """Write back and drop all resident pages (no-op without paging), e.g. before evaluation."""
        for store in self._stores.values():
            if isinstance(store, PagedStateStore):
                store.evict_all()

    def set_paging(self, paging: PagingConfig | None) -> None:
        """Move all state under a new paging config (or off), keeping it bit-exact."""
        sd = self.state_dict()
        sd["paging"] = paging.to_dict() if paging else None
        self.load_state_dict(sd)

    # ---- checkpointing -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                index.setdefault(id(p), len(index))
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        state = {}
        for group in self.param_groups:
            for p in group["params"]:
                st = self.get_state(p)
                if st:
                    state[index[id(p)]] = st
        return {
            "state": state,
            "param_groups": groups,
            "paging": self._paging.to_dict() if self._paging else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters, state (32-bit, or 8-bit codes + absmax, bit-exact) and the paging config.

        Accepts torch ``AdamW`` state dicts too (32-bit keys). A missing ``paging`` key keeps the current config.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} parameter groups, optimizer has {len(self.param_groups)}"
            )
        for i, (g, sg) in enumerate(zip(self.param_groups, saved_groups, strict=True)):
            unsupported = [k for k in ("amsgrad", "maximize") if sg.get(k)]
            if unsupported:
                raise ValueError(f"parameter group {i} uses {unsupported}, which this AdamW does not implement")
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"parameter group {i}: state dict has {len(sg['params'])} params, optimizer has {len(g['params'])}"
                )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in self.param_groups),
                strict=True,
            )
        )
        if "paging" in state_dict:
            cfg = state_dict["paging"]
            self._paging = PagingConfig.from_dict(cfg) if cfg is not None else None
        self.synchronize()
        self._stores = {}
        self.state = defaultdict(dict)
        for g, sg in zip(self.param_groups, saved_groups, strict=True):
            for k, v in sg.items():
                if k != "params":
                    g[k] = tuple(v) if k == "betas" else v
            for k, v in self.defaults.items():
                g.setdefault(k, v)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for key, st in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state dict has state for unknown parameter index {key}")
            p = id_map[key]
            self._import_state(p, group_of[id(p)], st)

    def _import_state(self, p: torch.Tensor, group: dict[str, Any], st: dict[str, Any]) -> None:
        bits = 8 if "state1" in st else 32
        keys = _KEYS8 if bits == 8 else _KEYS32
        missing = [k for k in keys if k not in st]
        if missing:
            raise ValueError(f"state for a parameter of shape {tuple(p.shape)} lacks {missing}")
        n, bs = local_shard(p).numel(), group["blocksize"]
        nb = -(-n // bs)
        for k in keys:
            want = nb if k.startswith("absmax") else n
            if st[k].numel() != want:
                raise ValueError(
                    f"state '{k}' has {st[k].numel()} elements, expected {want} for a parameter of "
                    f"{n} elements with blocksize {bs}"
                )
        state = self._init_state(p, group, bits=bits)
        state["step"] = int(st["step"])
        store = self._store(p.device)
        dtypes = {"exp_avg": torch.float32, "exp_avg_sq": torch.float32, "absmax1": torch.float32}
        dtypes |= {"absmax2": torch.float32, "state1": torch.uint8, "state2": torch.uint8}
        flat = {k: st[k].detach().reshape(-1).to("cpu", dtypes[k]) for k in keys}
        for seg in state["segments"]:
            m = seg.stop - seg.start
            buf = torch.zeros(_segment_nbytes(bits, m, bs), dtype=torch.uint8)
            views = _segment_views(buf, bits, m, bs)
            b0, b1 = seg.start // bs, -(-seg.stop // bs)
            for k in keys:
                src = flat[k][b0:b1] if k.startswith("absmax") else flat[k][seg.start : seg.stop]
                views[k].copy_(src)
            store.write(seg.page, buf)

    def synchronize(self) -> None:
        """Wait for all pending page copies (host reads of the state are then consistent)."""
        for store in self._stores.values():
            store.synchronize()
