"""Hottest-expert-bit-first (HEBF): the order in which one layer's missing expert slices are read.

For the tokens of a step, B[j][k] counts the tokens that chose expert j at width k. Each expert has a
queue of the slices it still lacks, in ascending width; a slice s is needed by every token that uses the
expert at a width >= s, so its heat is sum_{k >= s} B[j][k], and heat never rises along a queue. The
scheduler repeatedly issues the queue head with the highest heat (the D2MoE paper's rule): the experts
most tokens wait on get their base first, the widely shared low planes come before the rarely needed
high ones, and compute can start on whatever is complete while the rest loads.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

Load = tuple[int, int]  # (expert, slice bits)
Chunk = tuple[int, int, int]  # (expert, first slice, last slice): one contiguous read


def slice_heat(counts: Mapping[int, int], bits: int) -> int:
    """Tokens that need slice `bits` of an expert: those using it at any width >= bits."""
    return sum(n for b, n in counts.items() if b >= bits)


def hebf_order(counts: Mapping[int, Mapping[int, int]], held: Mapping[int, int], min_bits: int = 2) -> list[Load]:
    """Loads for one layer in issue order.

    counts[expert][bits]: tokens that chose `expert` at width `bits` (B[j][k]).
    held[expert]: top slice already resident or in flight (min_bits - 1, or absent, for none).
    Ties go to the lower slice, then the lower expert id, so the order is deterministic.
    """
    heads: list[tuple[int, int, int]] = []  # (-heat, slice, expert)
    top: dict[int, int] = {}
    for expert, per_width in counts.items():
        want = max((b for b, n in per_width.items() if n > 0), default=min_bits - 1)
        first = max(held.get(expert, min_bits - 1) + 1, min_bits)
        if first <= want:
            top[expert] = want
            heapq.heappush(heads, (-slice_heat(per_width, first), first, expert))
    order: list[Load] = []
    while heads:
        _, bits, expert = heapq.heappop(heads)
        order.append((expert, bits))
        if bits < top[expert]:
            heapq.heappush(heads, (-slice_heat(counts[expert], bits + 1), bits + 1, expert))
    return order


def hebf_chunks(counts: Mapping[int, Mapping[int, int]], held: Mapping[int, int], min_bits: int = 2) -> list[Chunk]:
    """HEBF over runs of slices: an expert's consecutive slices are contiguous in the file, so they are read
    with one scattered read (preadv), cut only where some token's demanded width ends, so an expert can
    still be computed at a lower demanded width before its higher planes land. Chunks come in HEBF order
    (the heat of a chunk is that of its first slice, its hottest)."""
    order = hebf_order(counts, held, min_bits)
    ends = {e: {b for b, n in per.items() if n > 0} for e, per in counts.items()}
    chunks: list[Chunk] = []
    open_at: dict[int, int] = {}  # expert -> index of its chunk still growing
    for expert, bits in order:
        i = open_at.get(expert)
        if i is not None and chunks[i][2] == bits - 1 and bits - 1 not in ends[expert]:
            chunks[i] = (expert, chunks[i][1], bits)
        else:
            open_at[expert] = len(chunks)
            chunks.append((expert, bits, bits))
    return chunks
