"""The plane-level expert cache: byte accounting per (layer, expert, slice) inside one fixed arena.

Slice 2 is an expert's base (offsets, scales, 2-bit codes); slice b >= 3 its sign plane b. An expert is
usable at width w when slices 2..w are resident. Rules:
- a slice is reserved (a slot allocated) before its read is issued, and marked ready when the read lands;
  reserved-but-unread slices are never evicted (a read may still be writing into them);
- only an expert's top slice may be evicted, so lower planes outlive their higher ones and an expert that
  loses planes stays usable at a lower width;
- a pinned expert (in use by the current layer) loses nothing.
All state lives here and is touched by the compute thread only; the loader just fills slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from d2moe.cache.arena import BASE, PLANE, Slot, SlotArena
from d2moe.cache.policy import CachePolicy, eviction_scores, update_usage

MIN_BITS = 2
NONE = MIN_BITS - 1  # "no slice held"


@dataclass
class PlaneCacheStats:
    hits: int = 0  # demanded (expert, width) already resident when its layer started
    misses: int = 0
    slices_loaded: int = 0
    bytes_loaded: int = 0
    evictions: int = 0  # slices evicted
    evicted_bytes: int = 0
    full_budget_refusals: int = 0  # a slot could not be had: everything evictable was pinned or in flight


class PlaneCache:
    """Expert slices of `num_layers` MoE layers x `num_experts` experts, widths 2..max_bits."""

    def __init__(
        self,
        budget_bytes: int,
        num_layers: int,
        num_experts: int,
        max_bits: int,
        base_bytes: int,
        plane_bytes: int,
        policy: CachePolicy | None = None,
    ) -> None:
        self.arena = SlotArena(budget_bytes, base_bytes, plane_bytes)
        self.n, self.E, self.max_bits = num_layers, num_experts, max_bits
        self.policy = policy or CachePolicy()
        self.held = np.full((num_layers, num_experts), NONE, dtype=np.int64)  # top slice reserved
        self.done = np.zeros((num_layers, num_experts), dtype=np.int64)  # bitmask of ready slices
        self.ready = np.full((num_layers, num_experts), NONE, dtype=np.int64)  # widest usable width
        self.fresh = np.zeros((num_layers, num_experts), dtype=np.int64)  # bitmask: slices read since last visit
        self.pins = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.p = np.zeros((num_layers, num_experts, max_bits - NONE), dtype=np.float64)  # usage per slice
        self.last_use = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.expected = np.zeros((num_layers, num_experts), dtype=bool)  # predicted for the layer's next visit
        self.slots: dict[tuple[int, int, int], Slot] = {}
        self._owner: dict[tuple[int, int], tuple[int, int, int]] = {}  # (cls, index) -> (layer, expert, bits)
        self._bound: dict[tuple[int, int], dict[int, object]] = {}
        self.as_codes = np.zeros((num_layers, num_experts), dtype=bool)  # slots hold byte codes (quant/codes.py)
        # the arena holds every slice of every expert at once: nothing will ever be evicted
        self.roomy = self.arena.size >= num_layers * num_experts * (base_bytes + (max_bits - MIN_BITS) * plane_bytes)
        self.clock = 0
        self.current = 0
        self.stats = PlaneCacheStats()
        self._grid = np.meshgrid(np.arange(num_layers), np.arange(num_experts), indexing="ij")
        self._top: np.ndarray | None = None  # eviction score of every expert's top slice; None: stale
        self._whole = [False] * num_layers  # roomy only: every expert of the layer resident at max_bits, for good

    # --- queries ------------------------------------------------------------------------------------
    @property
    def budget_bytes(self) -> int:
        return self.arena.size

    @property
    def used_bytes(self) -> int:
        return self.arena.used_bytes

    def resident_bits(self, layer: int, expert: int) -> int:
        """Widest usable width: slices 2..w all ready (NONE = 1 if not even the base is)."""
        return int(self.ready[layer, expert])

    def _update_ready(self, layer: int, expert: int) -> None:
        done, w = int(self.done[layer, expert]), NONE
        while w < self.max_bits and done >> (w + 1) & 1:
            w += 1
        self.ready[layer, expert] = w

    def layer_resident(self, layer: int, bits: int) -> bool:
        """Every expert of `layer` is usable at `bits` (nothing to prefetch there). A roomy cache never
        evicts, so a layer found whole stays whole: remembered, not re-checked every step."""
        if self._whole[layer]:
            return True
        whole = bool((self.ready[layer] >= bits).all())
        if whole and self.roomy and bits == self.max_bits:
            self._whole[layer] = True
        return whole

    def held_bits(self, layer: int, expert: int) -> int:
        """Top slice reserved, ready or in flight."""
        return int(self.held[layer, expert])

    def is_ready(self, layer: int, expert: int, bits: int) -> bool:
        return bool(self.done[layer, expert] >> bits & 1)

    def slice_view(self, layer: int, expert: int, bits: int) -> torch.Tensor:
        return self.arena.view(self.slots[(layer, expert, bits)])

    def score(self, layer: int, expert: int, bits: int) -> float:
        """Expected layer visits until slice `bits` of this expert is needed (what a prefetch must beat);
        under `lru`, visits since its last use."""
        return float(eviction_scores(self.policy, self._p(layer, expert, bits), layer, self.last_use[layer, expert],
                                     self.current, self.clock, self.n))

    # --- usage --------------------------------------------------------------------------------------
    def visit(self, layer: int, needed_bits: dict[int, int]) -> None:
        """A layer starts: record which experts it needs and up to which width (updates usage and clock).
        A roomy cache whose layer is whole skips the usage scores: nothing will ever be evicted by them."""
        self.clock += 1
        self.current = layer
        if self._whole[layer]:
            return
        self._top = None
        self.expected[layer] = False
        need = np.zeros((self.E, self.max_bits - NONE), dtype=bool)
        for e, b in needed_bits.items():
            need[e, : b - NONE] = True
            self.last_use[layer, e] = self.clock
        self.p[layer] = update_usage(self.p[layer], need, self.policy.decay)

    def expect(self, layer: int, experts: list[int]) -> None:
        """A prefetch predicted these experts for the layer's next visit: until then they count as sure to be
        used (p = 1), so the demands in between do not evict what was just prefetched."""
        self.expected[layer, experts] = True
        if self._top is not None:
            for e in experts:
                self._held_changed(layer, e)

    def _p(self, layer, expert, bits):  # usage probability, 1 for an expected expert
        return np.where(self.expected[layer, expert], 1.0, self.p[layer, expert, bits - MIN_BITS])

    def take_fresh(self, layer: int, used: dict[int, int], slice_bytes: Callable[[int], int]) -> int:
        """Bytes of this layer's slices read since its last visit that the visit used (slices 2..used[e] of
        each used expert); forgets the rest. Reads minus this sum is what prefetching wasted."""
        total = 0
        for e, bits in used.items():
            mask = int(self.fresh[layer, e])
            total += sum(slice_bytes(b) for b in range(MIN_BITS, bits + 1) if mask >> b & 1)
        self.fresh[layer] = 0
        return total

    def pin(self, layer: int, expert: int) -> None:
        self.pins[layer, expert] += 1

    def unpin(self, layer: int, expert: int) -> None:
        if self.pins[layer, expert] <= 0:
            raise RuntimeError(f"unpin of unpinned expert {expert} of layer {layer}")
        self.pins[layer, expert] -= 1

    def hold_as_codes(self, layer: int, expert: int) -> None:
        """The expert's slots now hold byte codes, not planes: it is pinned for good (its slices can no
        longer be evicted one by one) and its compute objects, bound to planes, are dropped."""
        if self.as_codes[layer, expert]:
            return
        if not self.roomy or self.resident_bits(layer, expert) != self.max_bits:
            raise RuntimeError(f"expert {expert} of layer {layer}: byte codes need every slice resident in a "
                               "cache that never evicts")
        self.as_codes[layer, expert] = True
        self.pins[layer, expert] += 1
        self._bound.pop((layer, expert), None)

    # --- reserve / complete -------------------------------------------------------------------------
    def reserve(self, layer: int, expert: int, bits: int, limit: float | None = None) -> Slot | None:
        """Allocate slice `bits` (the one above the held top), evicting as the policy says. With `limit`
        (a prefetch), only slices expected to be needed later than `limit` visits are evicted. None: no
        room (everything else pinned or in flight, or nothing cheap enough)."""
        if bits != self.held[layer, expert] + 1 or bits > self.max_bits:
            raise ValueError(f"expert {expert} of layer {layer}: reserve slice {bits} above {self.held[layer, expert]}")
        cls = BASE if bits == MIN_BITS else PLANE
        slot = self._alloc(cls, limit, keep=(layer, expert))
        if slot is None:
            if limit is None:
                self.stats.full_budget_refusals += 1
            return None
        self.slots[(layer, expert, bits)] = slot
        self._owner[(slot.cls, slot.index)] = (layer, expert, bits)
        self.held[layer, expert] = bits
        self._held_changed(layer, expert)
        return slot

    def complete(self, layer: int, expert: int, bits: int) -> None:
        """The read of a reserved slice landed (CRC checked)."""
        if (layer, expert, bits) not in self.slots:
            raise RuntimeError(f"slice {bits} of expert {expert}, layer {layer} completed but was not reserved")
        self.done[layer, expert] |= 1 << bits
        self.fresh[layer, expert] |= 1 << bits
        self._update_ready(layer, expert)
        self.stats.slices_loaded += 1
        self.stats.bytes_loaded += self.slots[(layer, expert, bits)].nbytes

    def drop(self, layer: int, expert: int) -> None:
        """Evict every slice of an expert (a different-width copy under matryoshka-free). Refused for a
        pinned expert or one with a read in flight."""
        if self.pins[layer, expert] or not self._all_ready()[layer, expert]:
            raise RuntimeError(f"expert {expert} of layer {layer} is pinned or being read: cannot drop it")
        while self.held[layer, expert] >= MIN_BITS:
            self._evict_top(layer, expert)

    def abandon(self, layer: int, expert: int, bits: int) -> None:
        """A reserved slice whose read failed or was cancelled (no read is writing it any more): free it and
        every reserved slice above it."""
        while self.held[layer, expert] >= bits:
            self._release_top(layer, expert)

    # --- bound experts ------------------------------------------------------------------------------
    def bound(self, layer: int, expert: int, bits: int, make: Callable[[list[Slot]], object]) -> object:
        """The compute object for (expert, width) over its resident slices' slots, built once per width."""
        if self.resident_bits(layer, expert) < bits:
            raise RuntimeError(f"expert {expert} of layer {layer} is not resident at {bits} bits")
        per = self._bound.setdefault((layer, expert), {})
        fn = per.get(bits)
        if fn is None:
            fn = per[bits] = make([self.slots[(layer, expert, b)] for b in range(MIN_BITS, bits + 1)])
        return fn

    # --- eviction -----------------------------------------------------------------------------------
    def _release_top(self, layer: int, expert: int) -> None:
        bits = int(self.held[layer, expert])
        slot = self.slots.pop((layer, expert, bits))
        del self._owner[(slot.cls, slot.index)]
        self.arena.release(slot)
        self.held[layer, expert] = bits - 1
        self._held_changed(layer, expert)
        self.done[layer, expert] &= ~(1 << bits)
        self.ready[layer, expert] = min(self.ready[layer, expert], bits - 1)
        self._whole[layer] = False  # (matryoshka-free's drop, or a failed read: even a roomy cache loses one)
        per = self._bound.get((layer, expert))
        if per:
            for b in [b for b in per if b >= bits]:
                del per[b]

    def _evict_top(self, layer: int, expert: int) -> None:
        self.stats.evictions += 1
        self.stats.evicted_bytes += self.slots[(layer, expert, int(self.held[layer, expert]))].nbytes
        self._release_top(layer, expert)

    def _evictable(self) -> np.ndarray:
        """[n, E] experts whose top slice may go: held, all held slices ready, not pinned."""
        ready_top = (self.done >> self.held) & 1
        return (self.held >= MIN_BITS) & (ready_top == 1) & (self.pins == 0) & self._all_ready()

    def _all_ready(self) -> np.ndarray:
        full = (1 << (self.held + 1)) - (1 << MIN_BITS)  # bits 2..held set
        return (self.done & full) == full

    def _top_scores(self, bits: np.ndarray) -> np.ndarray:
        """[n, E] eviction score of slice `bits[l, e]` of every expert (larger: evict first)."""
        p = self._p(self._grid[0], self._grid[1], np.maximum(bits, MIN_BITS))
        return eviction_scores(self.policy, p, self._grid[0], self.last_use, self.current, self.clock, self.n)

    def _held_scores(self) -> np.ndarray:
        """Scores of the held top slices, kept between allocations until the next visit changes usage."""
        if self._top is None:
            self._top = self._top_scores(self.held)
        return self._top

    def _held_changed(self, layer: int, expert: int) -> None:
        if self._top is not None:
            h = int(self.held[layer, expert])
            self._top[layer, expert] = self.score(layer, expert, h) if h >= MIN_BITS else 0.0

    def _alloc(self, cls: int, limit: float | None, keep: tuple[int, int]) -> Slot | None:
        slot = self.arena.alloc(cls)
        if slot is not None:
            return slot
        floor = -np.inf if limit is None else limit
        while True:
            ok = self._evictable()
            ok[keep] = False
            # 1. the least valuable top slice of the same class frees exactly one slot; evicting it changes
            #    only that expert's top, so repeat without rescoring the others
            same = ok & ((self.held == MIN_BITS) if cls == BASE else (self.held > MIN_BITS))
            scores = np.where(same, self._held_scores(), -np.inf)
            while True:
                i = int(scores.argmax())
                layer, expert = divmod(i, self.E)
                if scores.flat[i] <= floor or not same.flat[i]:
                    break
                self._evict_top(layer, expert)
                slot = self.arena.alloc(cls)
                if slot is not None:
                    return slot
                still = self.held[layer, expert] > MIN_BITS if cls == PLANE else False
                scores[layer, expert] = self.score(layer, expert, int(self.held[layer, expert])) if still else -np.inf
            # 2. move the boundary (the other class's outermost slots go, with whatever sits above them), or
            #    for a base, drop a whole expert (planes, then base); whichever loses less
            shift = self._blocker_score(cls, ok)
            whole = None
            if cls == BASE:
                s = np.where(ok, self._top_scores(np.full_like(self.held, MIN_BITS)), -np.inf)
                i = int(s.argmax())
                if s.flat[i] > -np.inf:
                    whole = (float(s.flat[i]), *divmod(i, self.E))
            if shift is not None and (whole is None or shift >= whole[0]) and shift > floor:
                self._free_blockers(cls)
            elif whole is not None and whole[0] > floor:
                while self.held[whole[1], whole[2]] >= MIN_BITS:
                    self._evict_top(whole[1], whole[2])
            else:
                return None
            slot = self.arena.alloc(cls)
            if slot is not None:
                return slot

    def _blocker_score(self, cls: int, ok: np.ndarray) -> float | None:
        """The smallest score among the slices that moving the boundary would evict; None if it cannot."""
        blockers = self.arena.blockers(cls)
        if not blockers:
            return None
        owners = [self._owner[(s.cls, s.index)] for s in blockers]
        if not all(ok[layer, expert] for layer, expert, _ in owners):
            return None
        return min(self.score(layer, e, b) for layer, e, b in owners)

    def _free_blockers(self, cls: int) -> None:
        for slot in self.arena.blockers(cls) or []:
            owner = self._owner.get((slot.cls, slot.index))
            if owner is None:  # already gone with a slice evicted above it
                continue
            layer, expert, bits = owner
            while self.held[layer, expert] >= bits:
                self._evict_top(layer, expert)

    def check(self) -> None:
        """Invariants (tests call this after every operation)."""
        assert self.arena.used_bytes <= self.arena.size
        assert len(self.slots) == len(self._owner)
        for (layer, expert, bits), slot in self.slots.items():
            assert MIN_BITS <= bits <= self.held[layer, expert]
            assert self._owner[(slot.cls, slot.index)] == (layer, expert, bits)
        for layer in range(self.n):
            for expert in range(self.E):
                h = int(self.held[layer, expert])
                assert all((layer, expert, b) in self.slots for b in range(MIN_BITS, h + 1))
                assert self.done[layer, expert] >> (h + 1) == 0
                r = int(self.ready[layer, expert])
                assert r <= h and all(self.is_ready(layer, expert, b) for b in range(MIN_BITS, r + 1))
                assert not self._whole[layer] or r == self.max_bits  # a remembered whole layer is whole
                assert r == self.max_bits or not self.is_ready(layer, expert, r + 1)
