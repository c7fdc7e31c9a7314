"""Serves experts from a store through the compressed-byte cache, with synchronous reads: the `lru` policy.

Resident experts are yielded first, then missing ones are read one at a time on the compute thread (an
upgrade reads only the missing planes). This is the baseline the pipelined provider is measured against.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import torch

from d2moe.cache.expert_cache import BudgetError, Entry, ExpertCache
from d2moe.models.expert_provider import Demand, ExpertFn, ReadyBatch
from d2moe.quant.kernels import BoundExpert, load_kernel
from d2moe.quant.pack import unpack_expert
from d2moe.storage.reader import StoreReader


def expert_buffer(size: int) -> torch.Tensor:
    """A uint8 tensor of its own anonymous mapping, unmapped when the last reference goes: the heap would keep
    evicted experts' pages (a few MiB each, freed in no particular order), so the process outgrew its budget
    under a memory cgroup until its code pages thrashed (bench8x at 25 %: anonymous 444 of 451 MiB)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)  # one fault-in, not per page
    return torch.frombuffer(mmap.mmap(-1, max(size, 1), flags=flags), dtype=torch.uint8)[:size]


class StoreExpertProvider:
    def __init__(self, reader: StoreReader, cache: ExpertCache) -> None:
        self.reader = reader
        self.cache = cache
        cfg = reader.config
        self.layout = cfg.layout
        self.kernel = load_kernel()  # None: no compiler here, expert_ffn falls back to the torch path

    def min_budget(self, bits: int) -> int:
        """The smallest budget that can run at `bits`: one expert prefix (experts run one at a time)."""
        return self.layout.prefix_bytes(bits)

    def check_budget(self, bits: int) -> None:
        need = self.min_budget(bits)
        if self.cache.budget_bytes < need:
            raise BudgetError(
                f"memory budget {self.cache.budget_bytes} bytes is below one {bits}-bit expert ({need} bytes); "
                f"raise --memory-budget or lower --bits"
            )

    def _fn(self, entry: Entry, bits: int) -> ExpertFn:
        fn = entry.views.get(bits)
        if fn is None:  # unpacking and binding cost more than a decode-step matmul: once per width
            fn = entry.views[bits] = BoundExpert(unpack_expert(self.layout, entry.buf, bits), bits, self.kernel)
        return fn

    def _load(self, layer: int, expert: int, bits: int) -> Entry:
        key = (layer, expert)
        entry = self.cache.get(key)
        have = entry.bits if entry is not None else self.reader.min_bits - 1
        size = self.layout.prefix_bytes(bits)
        self.cache.make_room(size - (entry.buf.numel() if entry else 0), keep=key)
        buf = expert_buffer(size)
        if entry is not None:
            buf[: entry.buf.numel()] = entry.buf
            self.cache.stats.upgrades += 1
        self.reader.read_into(layer, expert, buf, have, bits)
        return self.cache.put(key, buf, bits)

    def preload(self, bits: int) -> int:
        """Read every expert at `bits` while the budget allows (the all-resident setting); returns how many."""
        cfg = self.reader.config.model
        loaded = 0
        for layer in cfg.moe_layers:
            for expert in range(cfg.num_experts):
                if self.cache.used_bytes + self.layout.prefix_bytes(bits) > self.cache.budget_bytes:
                    return loaded
                entry = self.cache.get((layer, expert))
                if entry is None or entry.bits < bits:
                    self._load(layer, expert, bits)
                loaded += 1
        return loaded

    def wants_prefetch(self, layer: int, bits: int) -> bool:
        return False

    def prefetch(self, layer: int, demands: list[Demand]) -> None:
        pass

    def warm(self, predictions: list[tuple[int, list[Demand]]]) -> None:
        pass

    def experts(self, layer: int, demands: list[Demand], hold: bool = False) -> Iterator[ReadyBatch]:
        """Entries are tensors kept alive by the functions yielded, so `hold` needs nothing here."""
        missing, resident = [], []
        for expert, bits, _ in demands:
            entry = self.cache.get((layer, expert))
            if entry is not None and entry.bits >= bits:
                self.cache.stats.hits += 1
                resident.append((expert, bits, self._fn(entry, bits)))
            else:
                missing.append((expert, bits))
        if resident:
            yield resident
        # The caller is done with them: an expert evicted by the reads below must be freed now, not when this
        # generator ends (a prompt demands a whole layer; holding its resident experts overshot the budget by
        # ~40 MB on bench8x at 25 %, and the process thrashed at its cgroup limit).
        del resident
        # Highest width first per expert so one read serves every width of that expert.
        missing.sort(key=lambda d: (d[0], -d[1]))
        for expert, bits in missing:
            entry = self.cache.get((layer, expert))
            if entry is not None and entry.bits >= bits:
                self.cache.stats.hits += 1
            else:
                self.cache.stats.misses += 1
                entry = self._load(layer, expert, bits)
            yield [(expert, bits, self._fn(entry, bits))]
