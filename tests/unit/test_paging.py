"""Paging of optimizer state on CPU: the "device" working set is separate host buffers, so page-in, write-back,
LRU eviction and the counters run for real. bnb's Paged* classes fall back to unpaged on CPU, so paged runs are
compared with our own unpaged optimizer, which must give the same bits."""

from __future__ import annotations

import io

import pytest
import torch

from qlora_pipeline.kernels.optim.adamw import AdamW
from qlora_pipeline.kernels.optim.paging import PagedStateStore, PagingConfig

SIZES = [(96, 64), (3000,), (20_000,), (130,)]  # 6144, 3000, 20000, 130 elements
PAGE = 8 << 10


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SIZES]


def _clone(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def _run(opts_params, steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in SIZES]
        for opt, ps in opts_params:
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
            opt.step()


def _same(a_opt, a_ps, b_opt, b_ps) -> bool:
    for p, q in zip(a_ps, b_ps, strict=True):
        if not torch.equal(p, q):
            return False
        sa, sb = a_opt.get_state(p), b_opt.get_state(q)
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


@pytest.mark.parametrize("bits", [32, 8])
def test_budget_below_total_evicts_reloads_and_stays_bit_identical(bits: int) -> None:
    budget = 3 * PAGE
    ref_ps, pg_ps = _params(0), _params(0)
    ref = AdamW(ref_ps, lr=1e-3, weight_decay=0.01, state_bits=bits)
    pg = AdamW(pg_ps, lr=1e-3, weight_decay=0.01, state_bits=bits, paging=PagingConfig(budget, PAGE, True))
    steps = 6
    _run([(ref, ref_ps), (pg, pg_ps)], steps, seed=1)
    st = pg.paging_stats()
    n_pages = sum(len(pg.state[p]["segments"]) for p in pg_ps)
    assert st["total_bytes"] > 2 * budget  # the budget really is smaller than the state
    assert st["pages_in"] > n_pages  # pages came back after being evicted
    assert st["pages_out"] > 0 and st["evictions"] > 0 and st["bytes_out"] > 0
    assert st["bytes_moved"] == st["bytes_in"] + st["bytes_out"]
    assert 0 < st["peak_working_set_bytes"] <= budget + PAGE
    assert st["working_set_bytes"] <= budget + PAGE
    assert _same(ref, ref_ps, pg, pg_ps)


def test_unlimited_budget_pages_in_once_and_prefetches() -> None:
    ps = _params(2)
    opt = AdamW(ps, state_bits=8, paging=PagingConfig(None, PAGE, True))
    _run([(opt, ps)], 3, seed=3)
    st = opt.paging_stats()
    n_pages = sum(len(opt.state[p]["segments"]) for p in ps)
    assert st["pages_in"] == n_pages and st["evictions"] == 0 and st["pages_out"] == 0
    assert st["prefetches"] == n_pages - 1  # every page but the first arrives ahead of its update
    assert st["peak_working_set_bytes"] == st["total_bytes"]
    opt.evict_all()
    st = opt.paging_stats()
    assert st["working_set_bytes"] == 0 and st["pages_out"] == n_pages


def test_prefetch_off_same_bits_no_prefetches() -> None:
    a_ps, b_ps = _params(4), _params(4)
    a = AdamW(a_ps, state_bits=8, paging=PagingConfig(2 * PAGE, PAGE, prefetch=True))
    b = AdamW(b_ps, state_bits=8, paging=PagingConfig(2 * PAGE, PAGE, prefetch=False))
    _run([(a, a_ps), (b, b_ps)], 3, seed=5)
    assert a.paging_stats()["prefetches"] > 0 and b.paging_stats()["prefetches"] == 0
    assert _same(a, a_ps, b, b_ps)


def test_budget_smaller_than_one_page_still_steps() -> None:
    ps = _params(6)
    ref_ps = _clone(ps)
    opt = AdamW(ps, state_bits=8, paging=PagingConfig(budget_bytes=0, page_bytes=PAGE))
    ref = AdamW(ref_ps, state_bits=8)
    _run([(opt, ps), (ref, ref_ps)], 2, seed=7)
    assert opt.paging_stats()["peak_working_set_bytes"] <= PAGE  # one page over a zero budget, never more
    assert _same(opt, ps, ref, ref_ps)


@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_resume_is_bit_identical_and_stays_paged(bits: int) -> None:
    cfg = PagingConfig(budget_bytes=2 * PAGE, page_bytes=PAGE, prefetch=True)
    ps = _params(8)
    opt = AdamW(ps, lr=1e-3, weight_decay=0.01, state_bits=bits, paging=cfg)
    _run([(opt, ps)], 3, seed=9)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    # the resumed run is built without paging: the checkpoint's config must come back with the state
    ps2 = _clone(ps)
    opt2 = AdamW(ps2, lr=1e-3, weight_decay=0.01, state_bits=bits)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    if bits == 8:
        assert sd["state"][2]["state1"].dtype == torch.uint8 and sd["state"][2]["absmax1"].numel() == 79
    opt2.load_state_dict(sd)
    assert opt2.paging == cfg
    assert all(isinstance(s, PagedStateStore) for s in opt2._stores.values())
    assert opt2.paging_stats()["working_set_bytes"] == 0  # loaded into the host store, nothing resident
    assert _same(opt, ps, opt2, ps2)
    _run([(opt, ps), (opt2, ps2)], 3, seed=10)
    assert _same(opt, ps, opt2, ps2)
    st = opt2.paging_stats()
    assert st["evictions"] > 0 and st["pages_in"] > 0 and st["peak_working_set_bytes"] <= 3 * PAGE


def test_set_paging_moves_state_both_ways_without_changing_bits() -> None:
    a_ps, b_ps = _params(11), _params(11)
    a = AdamW(a_ps, state_bits=8)
    b = AdamW(b_ps, state_bits=8)
    _run([(a, a_ps), (b, b_ps)], 2, seed=12)
    b.set_paging(PagingConfig(PAGE, 4096, True))
    _run([(a, a_ps), (b, b_ps)], 2, seed=13)
    assert b.paging_stats()["evictions"] > 0
    b.set_paging(None)
    assert b.paging is None and b.paging_stats()["pages_in"] == 0
    _run([(a, a_ps), (b, b_ps)], 2, seed=14)
    assert _same(a, a_ps, b, b_ps)


def test_store_lru_eviction_and_write_back() -> None:
    store = PagedStateStore(PagingConfig(budget_bytes=2048, page_bytes=1024, prefetch=True), torch.device("cpu"))
    pages = [store.new_page(1024) for _ in range(3)]
    for i, pid in enumerate(pages):  # write a marker into each page through the working set
        store.acquire(pid).fill_(i + 1)
        store.release(pid)
    # 3 pages, room for 2: page 0 (least recently used) was written back and evicted
    assert store.stats.evictions == 1 and store.stats.pages_out == 1
    assert store._pages[0].dev is None and bool((store._pages[0].host == 1).all())
    store.acquire(pages[1])  # touch 1, so 2 becomes the LRU
    store.release(pages[1], dirty=False)
    store.acquire(pages[0])  # page 0 comes back with its bytes, evicting page 2
    assert bool((store._pages[0].dev == 1).all()) and store._pages[2].dev is None
    store.release(pages[0])
    assert [bool((store.read(p) == i + 1).all()) for i, p in enumerate(pages)] == [True, True, True]
    store.set_budget(1024)
    assert store.stats.working_set_bytes <= 1024
    store.write(pages[1], torch.full((1024,), 9, dtype=torch.uint8))
    assert bool((store.read(pages[1]) == 9).all())


def test_paging_config_validation_and_round_trip() -> None:
    cfg = PagingConfig(budget_bytes=1 << 20, page_bytes=4096, prefetch=False)
    assert PagingConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="page_bytes"):
        PagingConfig(page_bytes=10)
    with pytest.raises(ValueError, match="budget_bytes"):
        PagingConfig(budget_bytes=-1)
    with pytest.raises(ValueError, match="unknown PagingConfig keys"):
        PagingConfig.from_dict({"budget": 1})
