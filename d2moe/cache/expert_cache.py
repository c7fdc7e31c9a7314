"""A byte-budgeted cache of *compressed* expert prefixes (the bytes a memory budget counts).

Each entry is the b-bit prefix of one expert blob in one uint8 buffer. The cache does no I/O and holds
no policy beyond least-recently-used eviction; the provider decides what to read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    upgrades: int = 0
    evictions: int = 0
    peak_bytes: int = 0


@dataclass
class Entry:
    buf: torch.Tensor  # uint8, exactly the prefix bytes of `bits`
    bits: int
    views: dict = field(default_factory=dict)  # the provider's bound experts over `buf` (zero-copy), per width


class BudgetError(ValueError):
    """The memory budget cannot hold what one step needs."""


class ExpertCache:
    """LRU over (layer, expert) entries; `used_bytes` never exceeds `budget_bytes`."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise BudgetError("the expert memory budget must be positive")
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Key) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def make_room(self, nbytes: int, keep: Key | None = None) -> None:
        """Evict least-recently-used entries (never `keep`) until `nbytes` more fit."""
        if nbytes > self.budget_bytes:
            raise BudgetError(f"an expert prefix of {nbytes} bytes exceeds the whole budget ({self.budget_bytes})")
        for key in list(self._entries):
            if self.used_bytes + nbytes <= self.budget_bytes:
                break
            if key != keep:
                self.used_bytes -= self._entries.pop(key).buf.numel()
                self.stats.evictions += 1
        if self.used_bytes + nbytes > self.budget_bytes:
            raise BudgetError(f"cannot fit {nbytes} bytes in the expert budget ({self.budget_bytes})")

    def put(self, key: Key, buf: torch.Tensor, bits: int) -> Entry:
        """Insert or replace `key`; the caller has made room for the size difference."""
        old = self._entries.pop(key, None)
        if old is not None:
            self.used_bytes -= old.buf.numel()
        entry = Entry(buf, bits)
        self._entries[key] = entry
        self.used_bytes += buf.numel()
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used_bytes)
        if self.used_bytes > self.budget_bytes:
            raise BudgetError("expert cache over budget; call make_room first")
        return entry
