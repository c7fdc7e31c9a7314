"""Plane-level cache accounting and eviction: hypothesis drives random operation sequences and the
invariants hold after every step (never over budget, pinned and in-flight slices never evicted, an
expert's lower planes outlive its higher ones)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.cache.arena import BASE, PAGE, PLANE, SlotArena
from d2moe.cache.plane_cache import NONE, PlaneCache
from d2moe.cache.policy import CachePolicy, expected_next_use, layer_distance, update_usage

LAYERS, EXPERTS, MAX_BITS = 3, 4, 6
BASE_BYTES, PLANE_BYTES = 3 * PAGE, PAGE

ops = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "complete", "pin", "unpin", "visit", "abandon", "prefetch", "whole", "drop"]),
        st.integers(0, LAYERS - 1),
        st.integers(0, EXPERTS - 1),
        st.integers(2, MAX_BITS),
    ),
    max_size=120,
)


def _snapshot(c: PlaneCache, layer: int, expert: int) -> dict:
    return {b: c.slots[(layer, expert, b)] for b in range(2, c.held_bits(layer, expert) + 1)}


@settings(max_examples=150, deadline=None)
@given(budget_pages=st.one_of(st.integers(3, 24), st.integers(84, 90)), seq=ops,  # 84+: roomy, never evicts
       policy=st.sampled_from(["d2moe", "lru"]))
def test_random_operations_keep_invariants(budget_pages, seq, policy):
    c = PlaneCache(budget_pages * PAGE, LAYERS, EXPERTS, MAX_BITS, BASE_BYTES, PLANE_BYTES, CachePolicy(policy))
    pending: set[tuple[int, int, int]] = set()
    pins: dict[tuple[int, int], int] = {}
    for op, layer, expert, bits in seq:
        protected = {k: _snapshot(c, *k) for k, n in pins.items() if n > 0}
        in_flight = {k: c.slots[k] for k in pending}
        if op in ("reserve", "prefetch"):
            b = c.held_bits(layer, expert) + 1
            if b <= MAX_BITS and c.reserve(layer, expert, b, limit=1.0 if op == "prefetch" else None) is not None:
                pending.add((layer, expert, b))
        elif op == "complete":
            mine = sorted(k for k in pending if k[:2] == (layer, expert))
            if mine:
                c.complete(*mine[0])
                pending.discard(mine[0])
        elif op == "pin":
            c.pin(layer, expert)
            pins[(layer, expert)] = pins.get((layer, expert), 0) + 1
        elif op == "unpin" and pins.get((layer, expert), 0) > 0:
            c.unpin(layer, expert)
            pins[(layer, expert)] -= 1
        elif op == "visit":
            c.visit(layer, {expert: bits})
        elif op == "whole":
            whole = c.layer_resident(layer, bits)
            assert whole == all(c.resident_bits(layer, e) >= bits for e in range(EXPERTS))
        elif op == "drop" and not pins.get((layer, expert)) and not any(k[:2] == (layer, expert) for k in pending):
            c.drop(layer, expert)  # matryoshka-free's: even a roomy cache can lose an expert
            c.check()
            continue  # it removes slices on purpose: the checks below are about eviction
        elif op == "abandon":
            mine = sorted(k for k in pending if k[:2] == (layer, expert))
            if mine and mine[-1][2] == c.held_bits(layer, expert):  # the top pending read failed
                c.abandon(*mine[-1])
                pending.discard(mine[-1])
        c.check()
        assert c.used_bytes <= budget_pages * PAGE
        for k, slots in protected.items():  # a pinned expert lost nothing (but a failed read of its own)
            if op == "abandon" and k == (layer, expert):
                continue
            assert all(c.slots.get((*k, b)) == s for b, s in slots.items()), (op, k)
        for k, s in in_flight.items():  # a slice being read was not evicted, unless abandoned on purpose
            if not (op == "abandon" and k[:2] == (layer, expert)):
                assert c.slots.get(k) == s


def test_evicts_top_slice_first_and_keeps_lower_width_usable():
    c = PlaneCache(5 * PAGE, 2, 2, 4, 2 * PAGE, PAGE)  # room for one base + 3 planes
    for b in (2, 3, 4):
        assert c.reserve(0, 0, b) is not None
        c.complete(0, 0, b)
    assert c.resident_bits(0, 0) == 4
    assert c.reserve(1, 0, 2) is not None  # needs a base slot: 2 pages, one free -> the top plane goes
    assert c.resident_bits(0, 0) == 3
    assert c.stats.evictions == 1


def test_pinned_expert_is_never_evicted_and_refusal_is_counted():
    c = PlaneCache(2 * PAGE, 2, 2, 3, PAGE, PAGE)
    c.reserve(0, 0, 2)
    c.complete(0, 0, 2)
    c.reserve(0, 1, 2)
    c.complete(0, 1, 2)
    c.pin(0, 0)
    c.pin(0, 1)
    assert c.reserve(1, 0, 2) is None
    assert c.stats.full_budget_refusals == 1
    c.unpin(0, 1)
    assert c.reserve(1, 0, 2) is not None
    assert c.resident_bits(0, 0) == 2 and c.resident_bits(0, 1) == NONE


def test_prefetch_limit_spares_slices_needed_sooner():
    c = PlaneCache(PAGE, 4, 1, 2, PAGE, PAGE)
    c.reserve(1, 0, 2)
    c.complete(1, 0, 2)
    for _ in range(20):
        c.visit(1, {0: 2})  # layer 1's expert is used on every visit: p -> 1
    c.visit(0, {})
    # from layer 0, layer 1 is 1 visit away: a prefetch for layer 3 (3 away) must not evict it
    assert c.reserve(3, 0, 2, limit=3.0) is None
    assert c.reserve(3, 0, 2) is not None  # a demand may


def test_arena_boundary_moves_between_classes():
    a = SlotArena(6 * PAGE, 2 * PAGE, PAGE)
    bases = [a.alloc(BASE) for _ in range(3)]
    assert all(bases) and a.alloc(PLANE) is None
    assert a.blockers(PLANE) == [bases[2]]
    a.release(bases[2])
    planes = [a.alloc(PLANE), a.alloc(PLANE)]
    assert all(planes) and a.alloc(PLANE) is None and a.used_bytes == 6 * PAGE
    assert a.blockers(BASE) is not None
    assert {s.start for s in bases[:2] + planes} == {0, 2 * PAGE, 5 * PAGE, 4 * PAGE}
    with pytest.raises(ValueError):
        a.release(bases[2])


def test_policy_functions():
    assert layer_distance(3, 2, 5) == 1 and layer_distance(2, 2, 5) == 5 and layer_distance(0, 4, 5) == 1
    # a slice always used is needed after d visits; a rarely used one much later
    assert expected_next_use(1.0, 2, 10) == 2.0
    assert expected_next_use(0.1, 2, 10) > expected_next_use(0.5, 2, 10)
    p = update_usage(np.zeros(3), np.array([True, False, True]), 0.5)
    assert list(p) == [0.5, 0.0, 0.5]
    with pytest.raises(ValueError):
        CachePolicy("fifo")


def test_a_roomy_cache_remembers_whole_layers_until_one_loses_an_expert():
    c = PlaneCache(84 * PAGE, LAYERS, EXPERTS, MAX_BITS, BASE_BYTES, PLANE_BYTES)
    assert c.roomy
    for e in range(EXPERTS):
        for b in range(2, MAX_BITS + 1):
            c.reserve(0, e, b)
            assert not c.layer_resident(0, MAX_BITS)
            c.complete(0, e, b)
    assert c.layer_resident(0, MAX_BITS) and c._whole[0] and not c._whole[1]
    c.visit(0, {1: MAX_BITS})  # a whole layer's visit keeps no usage scores (nothing will be evicted)
    c.drop(0, 1)
    assert not c._whole[0] and not c.layer_resident(0, MAX_BITS) and c.layer_resident(0, NONE)
    c.check()
