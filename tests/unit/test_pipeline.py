"""The pipelined engine end to end on a tiny store: every policy gives the synchronous path's greedy tokens
at the same widths, under budgets that fit everything and budgets that thrash; loader errors are clear and
never hang; threads stop on close; a budget below the minimum is a clear error."""

from __future__ import annotations

import os
import shutil
import threading

import pytest
import torch

from d2moe.cache.expert_cache import BudgetError
from d2moe.config import EngineConfig
from d2moe.convert.convert import convert
from d2moe.engine.generate import GenerationStats, Request, generate
from d2moe.engine.model import open_model
from d2moe.engine.sampling import SamplingParams
from d2moe.io.loader import SliceLoader, SliceRead
from d2moe.storage.format import EXPERTS_FILE, StoreError
from d2moe.storage.reader import StoreReader

PROMPT = (5, 17, 33, 90, 4, 61, 7)


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    return convert(tiny_checkpoints["mixtral"], tmp_path_factory.mktemp("s") / "m.d2m", progress=False)


def _tokens(store, bits: int, n: int = 12, **engine) -> tuple[list[int], object]:
    with open_model(store, EngineConfig(context=64, step_tokens=len(PROMPT), **engine)) as m:
        toks = list(generate(m, Request(PROMPT, SamplingParams(max_tokens=n, stop_on_eos=False), bits)))
        return toks, m


def _expert_bytes(store, bits: int) -> int:
    return StoreReader(store).config.layout.prefix_bytes(bits)


def _minimum(store) -> int:
    with open_model(store, EngineConfig(context=64, step_tokens=len(PROMPT))) as m:
        return m.plan.minimum


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_every_policy_matches_the_synchronous_path(store, bits, one_thread):
    ref, _ = _tokens(store, bits, policy="lru")
    # the smallest arena that holds one step's experts at the demanded width (top-2 here), still thrashing
    low = _minimum(store) + 2 * _expert_bytes(store, bits)
    for policy, budget in [("d2moe", None), ("d2moe", low), ("d2moe", low + 3 * 4096), ("hold", None),
                           ("lru", low)]:
        got, m = _tokens(store, bits, policy=policy, memory_budget=budget)
        assert got == ref, (policy, budget)


def test_minimum_budget_runs_degraded_within_the_arena(store, one_thread):
    low = _minimum(store)
    toks, m = _tokens(store, 8, memory_budget=low)
    assert len(toks) == 12
    assert sum(m.provider.stats.degraded.values()) > 0  # 8 bits did not fit: computed with what fits
    assert m.cache.arena.peak_bytes <= m.plan.experts
    assert m.cache.stats.evictions > 0 and m.expert_bytes_read() > 0
    assert m.provider.loader.mode in ("O_DIRECT", "buffered+fadvise(DONTNEED)")


def test_no_stall_degrades_instead_of_waiting(store, one_thread):
    low = _minimum(store)
    toks, m = _tokens(store, 8, memory_budget=low + 8 * 4096, max_wait=0.0)
    assert len(toks) == 12
    used = sum(m.provider.stats.degraded.values())
    assert m.provider.stats.computed > 0 and used >= 0
    assert all(have < want for want, have in m.provider.stats.degraded)


def test_prefetch_predictions_are_counted(store, one_thread):
    _, m = _tokens(store, 8, memory_budget=_minimum(store) + 16 * 4096)
    hits = m.provider.stats.prediction_hit_rate()
    assert hits and all(0.0 <= r <= 1.0 for r in hits.values())


def test_budget_below_minimum_is_a_clear_error(store):
    low = _minimum(store)
    with pytest.raises(BudgetError, match="minimum"):
        open_model(store, EngineConfig(memory_budget=low - 1, context=64, step_tokens=len(PROMPT)))


def test_hold_policy_refuses_a_budget_that_cannot_hold_everything(store):
    with open_model(store, EngineConfig(memory_budget=_minimum(store), policy="hold", context=64,
                                        step_tokens=len(PROMPT))) as m:
        with pytest.raises(BudgetError, match="hold"):
            list(generate(m, Request(PROMPT, SamplingParams(max_tokens=2), 8)))


def _damage(path, how: str) -> None:
    if how == "truncate":
        os.truncate(path, 4096)  # the file shrinks under the running engine
        return
    with open(path, "r+b") as f:  # flip a byte of every blob's first slice, in place
        size = os.fstat(f.fileno()).st_size
        for pos in range(100, size, 4096):
            f.seek(pos)
            byte = f.read(1)
            f.seek(pos)
            f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("how,message", [("corrupt", "checksum mismatch"), ("truncate", "short read|truncated")])
def test_damaged_experts_fail_the_step_clearly(store, tmp_path, how, message, one_thread):
    bad = tmp_path / "bad.d2m"
    shutil.copytree(store, bad)
    m = open_model(bad, EngineConfig(context=64, step_tokens=len(PROMPT)))  # opened while intact
    _damage(bad / EXPERTS_FILE, how)
    with pytest.raises(StoreError, match=message):
        list(generate(m, Request(PROMPT, SamplingParams(max_tokens=4), 8)))
    m.close()
    assert not any(t.is_alive() for t in m.provider.loader._threads)


def test_loader_errors_reach_the_future_without_hanging(store, tmp_path):
    reader = StoreReader(store)
    entry = reader.entry(0, 0)
    layout = reader.config.layout
    n = layout.slice_bytes(2)
    copy = tmp_path / "x.bin"
    shutil.copy(reader.experts_path, copy)
    with SliceLoader(str(copy), direct=None) as loader:
        threads = list(loader._threads)
        dest = torch.empty(n, dtype=torch.uint8)
        if loader.direct:  # O_DIRECT needs an aligned buffer: use one from an arena
            from d2moe.cache.arena import SlotArena

            arena = SlotArena(n, n, 4096)
            dest = arena.view(arena.alloc(0))
        ok = loader.submit(SliceRead(0, 0, 2, entry.offset, (dest,), (entry.checksums[0],)), (0,))
        assert ok.result(timeout=10) is None
        assert bytes(dest.numpy()) == bytes(reader.read_expert(0, 0, 2).numpy())
        bad = loader.submit(SliceRead(0, 0, 2, entry.offset, (dest,), (entry.checksums[0] ^ 1,)), (0,))
        with pytest.raises(StoreError, match="checksum"):
            bad.result(timeout=10)
        os.truncate(copy, 0)
        short = loader.submit(SliceRead(0, 0, 2, entry.offset, (dest,), (entry.checksums[0],)), (0,))
        with pytest.raises(StoreError, match="short read"):
            short.result(timeout=10)
    assert not any(t.is_alive() for t in threads)
    reader.close()


def test_buffered_fallback_and_thread_shutdown(store, one_thread):
    ref, _ = _tokens(store, 8, policy="lru")
    got, m = _tokens(store, 8, direct_io=False, memory_budget=_minimum(store) + 8 * 4096)
    assert got == ref and m.provider.loader.mode.startswith("buffered")
    assert not any(t.is_alive() for t in m.provider.loader._threads)  # closed by the with-block


def test_a_model_never_closed_stops_its_threads_when_collected(store):
    import gc

    m = open_model(store, EngineConfig(context=64, step_tokens=len(PROMPT)))
    threads = list(m.provider.loader._threads)
    del m
    gc.collect()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


def test_generation_stats_and_close_are_idempotent(store):
    m = open_model(store, EngineConfig(context=64, step_tokens=len(PROMPT)))
    st = GenerationStats()
    list(generate(m, Request(PROMPT, SamplingParams(max_tokens=3, stop_on_eos=False), 8), st))
    assert st.generated_tokens == 3
    m.close()
    m.close()


def test_a_step_deadline_degrades_late_planes(store, one_thread):
    """A per-request deadline of ~0 on every decode step: experts whose high planes are not resident compute
    at the width they have instead of waiting; without it the same budget never degrades."""
    low = _minimum(store) + 8 * 4096
    with open_model(store, EngineConfig(context=64, step_tokens=len(PROMPT), memory_budget=low)) as m:
        toks = list(generate(m, Request(PROMPT, SamplingParams(max_tokens=12, stop_on_eos=False), 8,
                                        deadline=1e-9)))
        assert len(toks) == 12 and m.provider.deadline is None  # cleared after each step
        late = {k: n for k, n in m.provider.stats.degraded.items()}
    assert late and all(have < want for want, have in late)
    _, ref = _tokens(store, 8, memory_budget=low)
    stuck_only = sum(ref.provider.stats.degraded.values())
    assert sum(late.values()) > stuck_only


def test_prefill_warms_the_first_decode_layers(store, one_thread):
    """After a prefill the last prompt token's experts of the first MoE layers are read ahead (counted), and
    the first decode step finds them: its first MoE layer is predicted at least as well as by chance."""
    budget = _minimum(store) + 16 * 4096
    with open_model(store, EngineConfig(context=64, step_tokens=len(PROMPT), memory_budget=budget)) as m:
        cache = m.decoder.new_cache(1, 32)
        m.decoder.forward(torch.tensor([PROMPT]), cache, 8, last_only=True)
        assert m.provider.stats.warmed >= 1
        first = m.config.moe_layers[0]
        assert m.provider.predicted.get(m.provider.pos[first])  # a guess is waiting for the first layer
        issued = m.provider.stats.prefetch_issued
        assert issued > 0
        m.decoder.forward(torch.tensor([[PROMPT[-1]]]), cache, 8, last_only=True)
        assert first in m.provider.stats.predicted  # the warm-up's guess was scored against the real demand


def test_unsure_guesses_read_only_their_base_ahead(store, one_thread):
    """A prefetch reads a sure guess (rank right >= SURE_PREFETCH of the time) whole and an unsure one only
    as its base: its planes wait for the layer to show whether the guess was right."""
    from concurrent.futures import wait

    from d2moe.cache.plane_cache import MIN_BITS

    with open_model(store, EngineConfig(context=64, step_tokens=len(PROMPT))) as m:
        p = m.provider
        p.stats.rank_hits[1] = [1, 10]  # the second guess has been right 1 time in 10
        layer = m.config.moe_layers[-1]
        pos = p.pos[layer]
        p.prefetch(layer, [(0, 8, 1), (1, 8, 1)])  # rank 0: expert 0, rank 1: expert 1
        p._issue_prefetch()
        while p.inflight:
            wait(list(p.inflight.values()))
            p._poll()
        assert p.cache.held_bits(pos, 0) == 8 and p.cache.held_bits(pos, 1) == MIN_BITS


def test_a_cache_that_holds_everything_runs_experts_from_byte_codes(store, one_thread):
    """Every expert resident at 8 bits in a cache that never evicts: the experts become byte codes
    (quant/codes.py) and give the planes' tokens at every width (hold preloads; d2moe converts on first use)."""
    from d2moe.quant.kernels import load_kernel

    if load_kernel() is None or not load_kernel().avx512:
        pytest.skip("no byte-code kernel in this build")
    for bits in (8, 3):
        ref, _ = _tokens(store, bits, policy="lru")
        got, m = _tokens(store, bits, policy="hold")
        assert got == ref
        cache = m.provider.cache
        assert cache.roomy and cache.as_codes.all() == (bits == 8)
        assert (cache.pins[cache.as_codes] == 1).all()  # pinned for good, nothing else held
    with open_model(store, EngineConfig(context=64, step_tokens=len(PROMPT))) as m:
        m.provider.preload(8)
        assert m.provider.cache.as_codes.all()
        got = list(generate(m, Request(PROMPT, SamplingParams(max_tokens=12, stop_on_eos=False), 4)))
        assert got == _tokens(store, 4, policy="lru")[0]
