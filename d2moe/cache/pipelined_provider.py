"""Experts from a store, pipelined: HEBF-ordered slice reads on the loader threads, compute on whatever is
ready, cross-layer prefetch, and graceful degradation when high planes are late.

Per MoE layer (`experts()`):
  1. the layer's demand set (expert, width, tokens) pins its experts and updates the cache's usage stats;
  2. missing slices are reserved in the plane cache and queued in HEBF order (queued prefetches of this
     layer are raised to demand priority, unneeded ones cancelled);
  3. batches of experts whose slices are all resident are yielded to the MoE block, which computes them
     while the loader keeps reading; each expert is unpinned once computed, so a budget smaller than the
     layer's demand still streams through;
  4. when nothing is ready, the block waits for the next read; or, with `max_wait` (0 = --no-stall), an
     expert whose base is resident is computed at the width it has instead of waiting for its high planes.
`prefetch()` queues the predicted next layer's slices at low priority (bases first), evicting only
slices expected to be needed later than the prediction.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from queue import Empty, SimpleQueue
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch
from torch import Tensor

from d2moe.cache.arena import Slot
from d2moe.cache.plane_cache import MIN_BITS, PlaneCache
from d2moe.cache.policy import layer_distance
from d2moe.cache.transitions import ExpertTransitions
from d2moe.engine.policies import PolicySpec, policy_spec
from d2moe.cache.expert_cache import BudgetError
from d2moe.io.hebf import hebf_chunks
from d2moe.io.loader import SliceLoader, SliceRead
from d2moe.models.expert_provider import PREFETCH_MAX_TOKENS, Demand, ExpertFn, ReadyBatch
from d2moe.quant.kernels import BoundExpert
from d2moe.quant.pack import PackedMatrix, SliceArrays, assemble_expert, slice_arrays
from d2moe.storage.reader import StoreReader
from d2moe.util.signals import interrupts_deferred

DEMAND, PREFETCH = 0, 1  # priority classes of the I/O queue
SURE_PREFETCH = 0.8  # a prediction rank right this often is prefetched whole; others only their base


@dataclass
class PipelineStats:
    io_wait_seconds: float = 0.0  # compute thread blocked on a read (the bubbles)
    needed_bytes: int = 0  # bytes the demanded widths lacked before their layer's prefetch and demand reads
    wait_events: list[tuple[float, float]] = field(default_factory=list)  # (t0, t1) of waits, if recorded
    warmed: int = 0  # layers read ahead after a prefill (warm)
    degraded: Counter = field(default_factory=Counter)  # (demanded, used) width -> expert computations
    computed: int = 0  # expert computations yielded
    widths: Counter = field(default_factory=Counter)  # width an expert was computed at -> computations
    predicted: dict[int, list[int]] = field(default_factory=dict)  # layer -> [hits, demanded experts]
    rank_hits: dict[int, list[int]] = field(default_factory=dict)  # prediction rank -> [right, guesses]
    prefetch_issued: int = 0
    prefetch_cancelled: int = 0

    def prediction_hit_rate(self) -> dict[int, float]:
        return {layer: h / n for layer, (h, n) in sorted(self.predicted.items()) if n}


class PipelinedProvider:
    def __init__(
        self,
        reader: StoreReader,
        cache: PlaneCache,
        loader: SliceLoader,
        kernel: object | None,
        max_wait: float | None = None,
        spec: PolicySpec | None = None,
    ) -> None:
        self.reader, self.cache, self.loader, self.kernel = reader, cache, loader, kernel
        self.layout = reader.config.layout
        self.max_wait = max_wait
        self.deadline: float | None = None  # the running step's deadline (perf_counter time), set_deadline()
        self.spec = spec or policy_spec("d2moe")
        model = reader.config.model
        self.top_k = model.top_k
        self.transitions = ExpertTransitions(len(model.moe_layers), model.num_experts)
        self._copy: dict[tuple[int, int], int] = {}  # matryoshka-free: the width each expert's copy was read at
        self._last_step: tuple[int, list[int]] | None = None  # (pos, experts) of the layer just run
        self.pos = {layer: i for i, layer in enumerate(reader.config.model.moe_layers)}
        self.layers = reader.config.model.moe_layers
        self.inflight: dict[tuple[int, int, int], Future] = {}
        self.predicted: dict[int, list[int]] = {}  # pos -> predicted experts, surest first
        self._hint: tuple[int, list[Demand]] | None = None
        self._arrays: dict[tuple[int, int, int], SliceArrays] = {}
        self._codes: dict[tuple[int, int], dict[str, PackedMatrix]] = {}  # experts held as byte codes
        self._no_codes: set[tuple[int, int]] = set()  # experts the kernel cannot hold as codes
        self._landed: SimpleQueue = SimpleQueue()  # keys of finished reads, put by the loader threads
        self.stats = PipelineStats()

    # --- reads --------------------------------------------------------------------------------------
    def _issue(self, pos: int, expert: int, last: int, priority: tuple, limit: float | None = None) -> int:
        """Make slices up to `last` of an expert resident or in flight: reads already queued are raised to
        `priority`, the rest are reserved and read with one scattered read. Returns the top slice now held
        (below `last` when the cache had no room)."""
        for b in range(MIN_BITS, last + 1):
            fut = self.inflight.get((pos, expert, b))
            if fut is not None:
                self.loader.bump(fut, priority)
        first = self.cache.held_bits(pos, expert) + 1
        slots = []
        for b in range(first, last + 1):
            slot = self.cache.reserve(pos, expert, b, limit)
            if slot is None:
                break
            slots.append(slot)
        if slots:
            layer = self.layers[pos]
            entry = self.reader.entry(layer, expert)
            read = SliceRead(
                layer, expert, first, entry.offset + self.layout.slice_start(first),
                tuple(self.cache.arena.view(s) for s in slots),
                tuple(entry.checksums[b - MIN_BITS] for b in range(first, first + len(slots))),
            )
            fut = self.loader.submit(read, priority)
            keys = [(pos, expert, b) for b in range(first, first + len(slots))]
            for key in keys:
                self.inflight[key] = fut
            fut.add_done_callback(lambda _, keys=keys: [self._landed.put(k) for k in keys])
        return self.cache.held_bits(pos, expert)

    def _land(self, key: tuple[int, int, int]) -> None:
        fut = self.inflight.pop(key)
        try:
            fut.result()
        except BaseException:
            self.cache.abandon(*key)
            self._drain()
            raise
        self.cache.complete(*key)

    def _poll(self) -> None:
        while True:
            try:
                key = self._landed.get_nowait()
            except Empty:
                return
            fut = self.inflight.get(key)
            if fut is not None and fut.done() and not fut.cancelled():
                self._land(key)

    def _drain(self) -> None:
        """After a failed read: stop or wait out every read in flight and free their slots, so no loader
        thread writes into memory the cache may hand out again."""
        for key, fut in sorted(self.inflight.items(), key=lambda kv: -kv[0][2]):
            if not fut.cancel():  # running or finished: let it finish writing before its slot is freed
                wait([fut])
            del self.inflight[key]
            self.cache.abandon(*key)

    def _cancel_prefetches(self, pos: int, keep: set[int]) -> None:
        """Cancel queued prefetches of this layer's experts that it did not demand, top slice down, stopping
        at an expert's first read already running (slices below a running read must stay)."""
        stopped: set[int] = set()
        for key in sorted((k for k in self.inflight if k[0] == pos and k[1] not in keep), key=lambda k: -k[2]):
            if key[1] in stopped or self.cache.held_bits(pos, key[1]) != key[2]:
                stopped.add(key[1])
                continue
            if self.inflight[key].cancel():  # not started: give its slot back
                del self.inflight[key]
                self.cache.abandon(*key)
                self.stats.prefetch_cancelled += 1
            else:
                stopped.add(key[1])

    # --- compute objects ----------------------------------------------------------------------------
    def _slot_arrays(self, slot: Slot, bits: int) -> SliceArrays:
        key = (slot.cls, slot.index, bits)
        arrays = self._arrays.get(key)
        if arrays is None:  # a slot always holds the same kind of slice at the same place: views made once
            arrays = self._arrays[key] = slice_arrays(self.layout, bits, self.cache.arena.view(slot))
        return arrays

    def _fn(self, pos: int, expert: int, bits: int) -> ExpertFn:
        codes = self._codes.get((pos, expert)) or self._hold_as_codes(pos, expert)

        def make(slots: list[Slot]) -> BoundExpert:
            if codes is not None:  # every width from the same byte codes
                return BoundExpert(codes, bits, self.kernel)
            slices = [self._slot_arrays(s, b) for b, s in enumerate(slots, start=MIN_BITS)]
            return BoundExpert(assemble_expert(self.layout, slices), len(slots) + 1, self.kernel)

        return self.cache.bound(pos, expert, bits, make)  # type: ignore[return-value]

    def _hold_as_codes(self, pos: int, expert: int) -> dict[str, PackedMatrix] | None:
        """Turn a fully resident expert into byte codes (quant/codes.py), in place, when the cache never
        evicts (every slice of every expert fits) and the kernel reads codes: the decode kernel then loads
        64 codes where it rebuilt them from 8 planes. Returns its views, or None (left on planes)."""
        cache = self.cache
        if (self.kernel is None or not self.spec.nested or not cache.roomy or (pos, expert) in self._no_codes
                or cache.resident_bits(pos, expert) != cache.max_bits):
            return None
        slots = [cache.slots[(pos, expert, b)] for b in range(MIN_BITS, cache.max_bits + 1)]
        packed = assemble_expert(self.layout, [self._slot_arrays(s, b) for b, s in enumerate(slots, start=MIN_BITS)])
        if not all(self.kernel.can_hold_codes(pm) for pm in packed.values()):
            self._no_codes.add((pos, expert))
            return None
        with interrupts_deferred():  # a Ctrl-C must not leave matrices rewritten but not recorded as codes
            codes = {name: self.kernel.to_codes(pm) for name, pm in packed.items()}
            cache.hold_as_codes(pos, expert)
            self._codes[(pos, expert)] = codes  # type: ignore[assignment]
        return codes  # type: ignore[return-value]

    # --- the ExpertProvider interface ---------------------------------------------------------------
    def check_budget(self, bits: int) -> None:
        """Budgets are checked when the engine plans memory (see engine/memory.py)."""

    def experts(self, layer: int, demands: list[Demand], hold: bool = False) -> Iterator[ReadyBatch]:
        pos = self.pos[layer]
        counts: dict[int, dict[int, int]] = {}
        for e, b, n in demands:
            counts.setdefault(e, {})[b] = counts.get(e, {}).get(b, 0) + n
        want = {e: max(per) for e, per in counts.items()}
        self._poll()
        self._record_prediction(pos, set(want))
        if not self.spec.nested:
            self._separate_copies(pos, want)
        if self.spec.prefetch == "transition":
            self._predict_transition(pos, demands, want)
        if not self.inflight and self._hint is None and all(self.cache.ready[pos, e] >= b for e, b in want.items()):
            yield from self._all_hits(pos, demands, want)
            return
        self._cancel_prefetches(pos, set(want))
        self.cache.visit(pos, want)
        for e, b, _ in demands:
            if self.cache.resident_bits(pos, e) >= b:
                self.cache.stats.hits += 1
            else:
                self.cache.stats.misses += 1
        pinned = set(want)
        for e in pinned:
            self.cache.pin(pos, e)
        if all(self.cache.ready[pos, e] >= b for e, b, _ in demands):  # all hits: no queue
            try:
                self._issue_prefetch()
                yield [(e, b, self._fn(pos, e, b)) for e, b, _ in demands]
                self.stats.computed += len(demands)
                self.stats.widths.update(b for _, b, _ in demands)
            finally:
                self._done_with(pos, want, pinned)
            return
        clock = self.cache.clock
        try:
            queue = deque(self._chunks(pos, counts, want))
            for e in want:  # prefetched reads of this layer become demands
                self._issue(pos, e, self.cache.held_bits(pos, e), (DEMAND, clock, -1))
            remaining = {(e, b) for e, b, _ in demands}
            rank = 0
            first = True
            limit = self._wait_limit(pos)
            since = time.perf_counter()
            while remaining:
                self._poll()
                blocked = False
                while queue:
                    e, lo, hi = queue[0]
                    held = self.cache.held_bits(pos, e)
                    if held >= hi or e not in pinned:  # already held, or the expert was computed (degraded)
                        queue.popleft()
                    elif held >= lo - 1 and self._issue(pos, e, hi, (DEMAND, clock, rank)) >= hi:
                        queue.popleft()
                        rank += 1
                    else:
                        blocked = True
                        break
                if first:
                    self._issue_prefetch()
                    first = False
                ready = [(e, b) for e, b in remaining if self.cache.resident_bits(pos, e) >= b]
                layer_reads = [f for (p, e, _), f in self.inflight.items() if p == pos and e in pinned]
                if not ready:
                    stuck = blocked and not self.inflight  # no read will land to make room: compute what we have
                    ready = self._degraded(pos, remaining, stuck, time.perf_counter() - since, limit)
                if ready:
                    used = [(e, b, min(b, self.cache.resident_bits(pos, e))) for e, b in ready]
                    yield [(e, b, self._fn(pos, e, have)) for e, b, have in used]
                    self.stats.computed += len(ready)
                    self.stats.widths.update(have for _, _, have in used)
                    remaining.difference_update(ready)
                    for e in set() if hold else {e for e, _ in ready} - {e for e, _ in remaining}:
                        self.cache.unpin(pos, e)  # computed: its slots may serve the rest of the layer
                        pinned.discard(e)
                    since = time.perf_counter()
                    continue
                futs = layer_reads or list(self.inflight.values())  # other reads landing make slots evictable
                if not futs:
                    raise BudgetError(
                        f"layer {layer}: the expert cache ({self.cache.budget_bytes} bytes) cannot hold the base "
                        "of the experts this step needs; raise --memory-budget"
                    )
                t0 = time.perf_counter()
                # a deadline only matters while some remaining expert has its base (something to degrade
                # to); otherwise block until a read lands (a zero timeout here would spin and starve the loader)
                degradable = any(self.cache.resident_bits(pos, e) >= MIN_BITS for e, _ in remaining)
                timeout = None if limit is None or not degradable else max(limit - (t0 - since), 0.0)
                wait(futs, timeout=timeout, return_when=FIRST_COMPLETED)
                t1 = time.perf_counter()
                self.stats.io_wait_seconds += t1 - t0
                if self.loader.record:
                    self.stats.wait_events.append((t0, t1))
        finally:
            self._done_with(pos, want, pinned)

    def _all_hits(self, pos: int, demands: list[Demand], want: dict[int, int]) -> Iterator[ReadyBatch]:
        """Every demanded expert resident, no read in flight and no prefetch to queue (a resident working
        set): nothing can evict while the batch computes, so no pins and no queue. Same batch, same stats
        as the general path below, at a fraction of its per-layer cost."""
        self.cache.visit(pos, want)
        self.cache.stats.hits += len(demands)
        yield [(e, b, self._fn(pos, e, b)) for e, b, _ in demands]
        self.stats.computed += len(demands)
        self.stats.widths.update(b for _, b, _ in demands)
        self.stats.needed_bytes += self.cache.take_fresh(pos, want, self.layout.slice_bytes)

    def _separate_copies(self, pos: int, want: dict[int, int]) -> None:
        """matryoshka-free: an expert resident at another width than demanded is a different copy, so its
        slices are dropped and the demanded width is read from its base up (reads still in flight keep it)."""
        for e, b in want.items():
            copy = self._copy.get((pos, e))
            if copy is not None and copy != b and self.cache.held_bits(pos, e) >= MIN_BITS:
                if not any((pos, e, s) in self.inflight for s in range(MIN_BITS, self.cache.max_bits + 1)):
                    self.cache.drop(pos, e)
            self._copy[(pos, e)] = b

    def _predict_transition(self, pos: int, demands: list[Demand], want: dict[int, int]) -> None:
        """edgemoe: count this layer's experts as successors of the previous layer's, and hint the next
        layer's likeliest successors of these (decode-sized steps only, like the router prediction)."""
        experts = sorted(want)
        if self._last_step is not None and self._last_step[0] == pos - 1:
            self.transitions.observe(pos, self._last_step[1], experts)
        self._last_step = (pos, experts)
        tokens = sum(n for _, _, n in demands) / max(self.top_k, 1)
        nxt = pos + 1
        if tokens > PREFETCH_MAX_TOKENS or nxt >= len(self.layers) or not want:
            return
        bits = max(want.values())
        if self.cache.layer_resident(nxt, bits):
            return
        guess = self.transitions.predict(nxt, experts, self.top_k * max(int(tokens), 1))
        if guess:
            self._hint = (self.layers[nxt], [(e, bits, 1) for e in guess])

    def resident_widths(self, layer: int) -> Tensor:
        """[E] widest usable width of each expert of `layer` (1: not even its base), for width rules."""
        return torch.from_numpy(self.cache.ready[self.pos[layer]].copy())

    def _done_with(self, pos: int, want: dict[int, int], pinned: set[int]) -> None:
        for e in pinned:
            self.cache.unpin(pos, e)
        self.stats.needed_bytes += self.cache.take_fresh(pos, want, self.layout.slice_bytes)

    def _prefix(self, bits: int) -> int:
        return self.layout.prefix_bytes(bits) if bits >= MIN_BITS else 0

    def _chunks(self, pos: int, counts: dict[int, dict[int, int]], want: dict[int, int]) -> list:
        """HEBF chunks for this layer. When the layer's missing slices exceed what the cache can give it, every
        demanded expert's base is read first (bases in HEBF order, then the rest), so one expert's planes never
        take the room another expert needs to run at all."""
        held = {e: self.cache.held_bits(pos, e) for e in want}
        chunks = hebf_chunks(counts, held)
        need = sum(self._prefix(b) - self._prefix(held[e]) for e, b in want.items())
        room = self.cache.budget_bytes - sum(self._prefix(h) for h in held.values())
        if need <= room or not self.spec.bases_first:
            return chunks
        bases = [(e, lo, lo) for e, lo, _ in chunks if lo == MIN_BITS]
        rest = [(e, lo + 1, hi) if lo == MIN_BITS else (e, lo, hi) for e, lo, hi in chunks if hi > lo or lo > MIN_BITS]
        return bases + rest

    def set_deadline(self, deadline: float | None) -> None:
        """The coming step should end by `deadline` (time.perf_counter()); None: no deadline. Layers then
        wait for late planes at most their share of the time left, and compute with what is resident after."""
        self.deadline = deadline

    def _wait_limit(self, pos: int) -> float | None:
        """How long layer `pos` may wait for late planes: `max_wait` (--no-stall: 0), and with a step deadline
        an equal share of the time left among the MoE layers still to run; None: wait for every plane."""
        limits = [] if self.max_wait is None else [self.max_wait]
        if self.deadline is not None and self.spec.degrade:
            limits.append(max(self.deadline - time.perf_counter(), 0.0) / (len(self.layers) - pos))
        return min(limits) if limits else None

    def _degraded(self, pos: int, remaining: set[tuple[int, int]], stuck: bool, waited: float,
                  limit: float | None) -> list:
        """Experts to compute below their demanded width: when reads cannot be issued for lack of room
        (everything else pinned), or when high planes are late beyond `limit` (_wait_limit). Needs the base."""
        late = limit is not None and waited >= limit
        if not (late or stuck):
            return []
        usable = [(self.cache.resident_bits(pos, e), e, b) for e, b in remaining]
        usable = [u for u in usable if u[0] >= MIN_BITS]
        if not usable:
            return []
        have, e, b = max(usable)
        self.stats.degraded[(b, have)] += 1
        return [(e, b)]

    def wants_prefetch(self, layer: int, bits: int) -> bool:
        """False when every expert of `layer` is already usable at `bits` (skip predicting it)."""
        return not self.cache.layer_resident(self.pos[layer], bits)

    def prefetch(self, layer: int, demands: list[Demand]) -> None:
        """A prediction for a later layer. Its reads are queued once the current layer's demands are pinned
        and queued (so a prefetch never takes the slots the current layer is about to need)."""
        self._hint = (layer, demands)

    def warm(self, predictions: list[tuple[int, list[Demand]]]) -> None:
        """After a prefill (SliceMoE's predictive warm-up): queue each predicted layer's slices now, first
        layer first, at prefetch priority; a read only evicts slices expected later than its layer."""
        if self.spec.prefetch == "none":
            return
        for layer, demands in predictions:
            if demands and self.wants_prefetch(layer, max(b for _, b, _ in demands)):
                self.stats.warmed += 1
                self.prefetch(layer, demands)
                self._issue_prefetch()

    def _issue_prefetch(self) -> None:
        """Queue the predicted layer's slices at low priority, bases first; evict only what the cache
        expects to need later than that layer."""
        if self._hint is None:
            return
        (layer, demands), self._hint = self._hint, None
        pos = self.pos[layer]
        counts: dict[int, dict[int, int]] = {}
        for e, b, n in demands:
            counts.setdefault(e, {})[b] = counts.get(e, {}).get(b, 0) + n
        self.predicted[pos] = list(counts)
        unsure = {e for rank, e in enumerate(counts) if not self._sure(rank)}
        first = {e: {MIN_BITS: sum(per.values())} if e in unsure else per for e, per in counts.items()}
        self.cache.expect(pos, sorted(counts))
        self._poll()
        limit = float(layer_distance(pos, self.cache.current, self.cache.n))  # a sure use, d visits ahead
        chunks = hebf_chunks(first, {e: self.cache.held_bits(pos, e) for e in counts})
        for rank, (e, lo, hi) in enumerate(chunks):
            if self.cache.held_bits(pos, e) < lo - 1 or self.cache.held_bits(pos, e) >= hi:
                continue
            got = self._issue(pos, e, hi, (PREFETCH, self.cache.clock, rank), limit=limit)
            self.stats.prefetch_issued += 1
            if got < hi:
                break

    def _record_prediction(self, pos: int, actual: set[int]) -> None:
        guess = self.predicted.pop(pos, None)
        if guess is None:
            return
        hits, n = self.stats.predicted.get(self.layers[pos], [0, 0])
        self.stats.predicted[self.layers[pos]] = [hits + len(set(guess) & actual), n + len(actual)]
        for rank, e in enumerate(guess):
            right, total = self.stats.rank_hits.get(rank, [0, 0])
            self.stats.rank_hits[rank] = [right + (e in actual), total + 1]

    def _sure(self, rank: int) -> bool:
        """Whether guesses of this rank are right often enough to read all their planes ahead: a wrong
        guess is bytes the disk could have spent on a demanded slice, so the others get only their base (a
        quarter of an 8-bit expert) read ahead, their planes when the layer shows the guess was right
        (bench8x at 25 %, 8 bits: reading those planes ahead too, after every other prefetch, read 137.6 MB
        a token for 116.4 needed at 6.67 tok/s; base only 130.1 for 114.3 at 6.80; and taking even the
        80 %-right first guess as unsure 124.4 for 113.2 but at 6.43: it loses more overlap than bytes).
        Rates are counted as the engine runs, from an optimistic start."""
        right, total = self.stats.rank_hits.get(rank, [0, 0])
        return (right + 1) / (total + 1) >= SURE_PREFETCH

    def preload(self, bits: int) -> int:
        """Read every expert at `bits` if the cache can hold them all (the `hold` policy); returns how many
        experts are resident at `bits`. Stops at the first slice that does not fit."""
        n, total = 0, len(self.layers) * self.cache.E
        for pos in range(len(self.layers)):
            for e in range(self.cache.E):
                if self._issue(pos, e, bits, (PREFETCH, 0, 0), limit=float("inf")) < bits:
                    break
                n += 1
        while self.inflight:
            wait(list(self.inflight.values()))
            self._poll()
        if n == total and bits == self.cache.max_bits:  # all resident at full width: byte codes now, not mid-step
            for pos in range(len(self.layers)):
                for e in range(self.cache.E):
                    self._hold_as_codes(pos, e)
        return n

    def close(self) -> None:
        """Stop the loader (queued reads are cancelled, running ones finish) and forget reads in flight."""
        self.loader.close()
        self.inflight.clear()
