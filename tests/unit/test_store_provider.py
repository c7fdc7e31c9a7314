"""Experts through the byte-budgeted cache: same logits under any budget, budget never exceeded."""

from __future__ import annotations

import pytest
import torch

from d2moe.cache.expert_cache import BudgetError
from d2moe.convert.convert import convert
from d2moe.config import EngineConfig
from d2moe.engine.model import open_model


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    return convert(tiny_checkpoints["qwen2_moe"], tmp_path_factory.mktemp("s") / "q.d2m", progress=False)


def _logits(model, ids, bits):
    return model.decoder.forward(ids, model.decoder.new_cache(1, ids.shape[1]), bits)


def _lru(store, expert_budget=None):
    full = open_model(store, EngineConfig(policy="lru"))
    if expert_budget is None:
        return full
    rest = full.plan.budget - full.plan.experts  # dense + KV + scratch
    return open_model(store, EngineConfig(policy="lru", memory_budget=rest + expert_budget))


def test_tiny_budget_gives_same_logits(store):
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    full = _lru(store)
    one = 2 * full.provider.min_budget(8)  # the plan's minimum holds top-k (2) experts' bases; 8 bits needs more
    tight = _lru(store, one)
    torch.testing.assert_close(_logits(tight, ids, 8), _logits(full, ids, 8), rtol=0, atol=0)
    assert tight.cache.stats.peak_bytes <= one
    assert tight.cache.stats.evictions > 0


def test_upgrade_reads_only_missing_planes(store):
    model = _lru(store)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    _logits(model, ids, 3)
    after3 = model.reader.stats.bytes_read
    _logits(model, ids, 5)
    layout = model.provider.layout
    upgraded = model.cache.stats.upgrades
    assert upgraded > 0
    # every upgrade read exactly slices 4 and 5; no expert was read twice from scratch
    assert model.reader.stats.bytes_read - after3 <= upgraded * (layout.slice_bytes(4) + layout.slice_bytes(5)) + (
        model.cache.stats.misses - upgraded
    ) * layout.prefix_bytes(5)


def test_lower_width_reuses_resident_prefix(store):
    model = _lru(store)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    _logits(model, ids, 8)
    read = model.reader.stats.bytes_read
    _logits(model, ids, 2)
    assert model.reader.stats.bytes_read == read  # 2-bit experts are prefixes of the resident 8-bit ones


def test_budget_below_one_expert_is_an_error(store):
    base = _lru(store).provider.layout.slice_bytes(2)
    model = _lru(store, 2 * base)  # room for the plan's minimum (two 2-bit bases), not for one 8-bit expert
    with pytest.raises(BudgetError, match="below one 8-bit expert"):
        model.provider.check_budget(8)


def test_expert_buffers_give_their_memory_back_when_dropped() -> None:
    """The lru provider's buffers are mappings of their own: an evicted expert's pages leave the process
    (heap-allocated, they stayed and the process outgrew its cgroup)."""
    import gc

    from d2moe.cache.store_provider import expert_buffer

    def rss_kib() -> int:
        return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")).split()[1])

    before = rss_kib()
    bufs = [expert_buffer(8 << 20) for _ in range(4)]
    for b in bufs:
        b.fill_(7)
    assert bufs[0].numel() == 8 << 20 and int(bufs[3][-1]) == 7
    grown = rss_kib() - before
    del bufs, b
    gc.collect()
    assert grown >= 30 << 10 and rss_kib() - before < grown - (28 << 10)  # ~32 MiB in, ~all of it out


def test_evicted_experts_are_freed_while_a_layer_still_loads(store, monkeypatch):
    """A prompt demands a whole layer: the resident experts come first, then the missing ones are read, each
    read evicting. The provider must not keep the experts it yielded first alive while it reads (that
    overshot the budget by ~40 MB on bench8x at 25 % and thrashed the process at its cgroup limit)."""
    import gc
    import mmap
    import weakref

    import d2moe.cache.store_provider as sp

    made = []  # every mapping the provider makes for an expert, weakly: alive while any view of it is

    def tracked(size):
        m = mmap.mmap(-1, max(size, 1))
        made.append(weakref.ref(m))
        return torch.frombuffer(m, dtype=torch.uint8)[:size]

    monkeypatch.setattr(sp, "expert_buffer", tracked)
    one = _lru(store).provider.layout.prefix_bytes(8)
    tight = _lru(store, 3 * one)
    layer, E = tight.config.moe_layers[0], tight.config.num_experts
    for batch in tight.provider.experts(layer, [(e, 8, 1) for e in range(3)]):  # three resident
        pass
    del batch
    gen = tight.provider.experts(layer, [(e, 8, 1) for e in range(E)])
    next(gen)  # the three resident ones, dropped at once by the caller
    for batch in gen:  # the rest, each read evicting one of the first three
        del batch
        gc.collect()
        alive = sum(r() is not None for r in made)
        assert alive <= 3, f"{alive} expert buffers alive under a budget of 3"
    assert tight.cache.stats.evictions > 0
