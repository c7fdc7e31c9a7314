"""HEBF ordering is a pure function: hottest queue head first, each expert's slices in ascending width."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from d2moe.io.hebf import hebf_order, slice_heat


def test_paper_example():
    # expert 0: 3 tokens at 2 bits, 1 at 4; expert 1: 2 tokens at 3 bits
    order = hebf_order({0: {2: 3, 4: 1}, 1: {3: 2}}, {})
    # heats: e0 slices 2:4, 3:1, 4:1; e1 slices 2:2, 3:2
    assert order == [(0, 2), (1, 2), (1, 3), (0, 3), (0, 4)]


def test_resident_slices_are_skipped():
    assert hebf_order({0: {4: 1}, 1: {2: 5}}, {0: 3, 1: 2}) == [(0, 4)]


counts = st.dictionaries(
    st.integers(0, 7), st.dictionaries(st.integers(2, 8), st.integers(1, 20), min_size=1, max_size=4), max_size=8
)


@given(counts=counts, held=st.dictionaries(st.integers(0, 7), st.integers(1, 8), max_size=8))
def test_order_properties(counts, held):
    order = hebf_order(counts, held)
    want = {(e, b) for e, per in counts.items() for b in range(max(held.get(e, 1) + 1, 2), max(per) + 1)}
    assert sorted(order) == sorted(want)  # every missing slice exactly once
    heats = [slice_heat(counts[e], b) for e, b in order]
    assert heats == sorted(heats, reverse=True)  # hottest first, globally
    for e in counts:  # each expert's queue in ascending width
        mine = [b for x, b in order if x == e]
        assert mine == sorted(mine)


def test_chunks_cut_at_demanded_widths():
    from d2moe.io.hebf import hebf_chunks

    # expert 0: widths 3 and 6 demanded -> [2..3] then [4..6]; expert 1: width 4 -> [2..4]
    assert hebf_chunks({0: {3: 2, 6: 1}, 1: {4: 1}}, {}) == [(0, 2, 3), (1, 2, 4), (0, 4, 6)]


@given(counts=counts, held=st.dictionaries(st.integers(0, 7), st.integers(1, 8), max_size=8))
def test_chunks_cover_the_same_loads(counts, held):
    from d2moe.io.hebf import hebf_chunks

    flat = [(e, b) for e, lo, hi in hebf_chunks(counts, held) for b in range(lo, hi + 1)]
    assert sorted(flat) == sorted(hebf_order(counts, held))
    for e in counts:  # per expert: chunks in ascending width, each ending at or below a demanded width
        mine = [b for x, b in flat if x == e]
        assert mine == sorted(mine)
