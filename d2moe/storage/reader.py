"""Reads expert slices from a store with positional reads; every slice is checked against its CRC32.

Reading b bits of an expert reads only its prefix; upgrading from a to b bits reads only slices a+1..b.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from d2moe.storage.checksum import crc32
from d2moe.storage.format import (
    EXPERTS_FILE,
    INDEX_FILE,
    BlobEntry,
    StoreConfig,
    StoreError,
    align_up,
    load_store_config,
)


@dataclass
class ReadStats:
    """Counters a caller can reset between measurements (owned by one reader, not global)."""

    bytes_read: int = 0
    reads: int = 0
    by_bits: dict[int, int] = field(default_factory=dict)


class StoreReader:
    """Opens a store directory, validates its index against experts.bin, and serves expert slices."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = Path(store_dir)
        self.config: StoreConfig = load_store_config(self.store_dir)
        self.min_bits = self.config.mwq.min_bits
        self.max_bits = self.config.mwq.max_bits
        self._entries = self._load_index()
        self.experts_path = self.store_dir / EXPERTS_FILE
        try:
            self._fd = os.open(self.experts_path, os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"{self.experts_path}: cannot open ({e.strerror})") from e
        size = os.fstat(self._fd).st_size
        for e in self._entries.values():
            end = e.offset + e.prefix_bytes[-1]
            if end > size:
                raise StoreError(
                    f"{self.experts_path}: truncated ({size} bytes) - expert {e.expert} of layer {e.layer} "
                    f"needs bytes up to {end}; re-run `d2moe convert`"
                )
        self.stats = ReadStats()

    def _load_index(self) -> dict[tuple[int, int], BlobEntry]:
        path = self.store_dir / INDEX_FILE
        try:
            blobs = json.loads(path.read_text())["blobs"]
            entries = {(b["layer"], b["expert"]): BlobEntry.from_dict(b) for b in blobs}
        except FileNotFoundError as e:
            raise StoreError(f"{path}: missing; the store is incomplete") from e
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise StoreError(f"{path}: malformed index ({e})") from e
        model = self.config.model
        width_count = self.max_bits - self.min_bits + 1
        for layer in model.moe_layers:
            for expert in range(model.num_experts):
                entry = entries.get((layer, expert))
                if entry is None:
                    raise StoreError(f"{path}: no entry for expert {expert} of layer {layer}")
                if len(entry.prefix_bytes) != width_count or len(entry.checksums) != width_count:
                    raise StoreError(f"{path}: entry for expert {expert} of layer {layer} has wrong slice count")
        return entries

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def entry(self, layer: int, expert: int) -> BlobEntry:
        try:
            return self._entries[(layer, expert)]
        except KeyError:
            raise StoreError(f"no expert {expert} in layer {layer} of {self.store_dir}") from None

    def prefix_bytes(self, layer: int, expert: int, bits: int) -> int:
        self._check_bits(bits)
        return self.entry(layer, expert).prefix_bytes[bits - self.min_bits]

    def _check_bits(self, bits: int) -> None:
        if not self.min_bits <= bits <= self.max_bits:
            raise ValueError(f"bits must be in {self.min_bits}..{self.max_bits}, got {bits}")

    def slice_range(self, layer: int, expert: int, bits: int) -> tuple[int, int]:
        """Byte range [start, end) of slice `bits` inside the expert's blob."""
        e = self.entry(layer, expert)
        i = bits - self.min_bits
        return (e.prefix_bytes[i - 1] if i else 0), e.prefix_bytes[i]

    def read_into(self, layer: int, expert: int, out: torch.Tensor, have_bits: int, bits: int) -> None:
        """Fill `out[prefix(have_bits):prefix(bits)]` (a uint8 tensor holding the blob prefix) from disk.

        `have_bits` is what `out` already holds (min_bits - 1 for nothing). Checks each slice's CRC32.
        """
        self._check_bits(bits)
        e = self.entry(layer, expert)
        start = self.slice_range(layer, expert, have_bits + 1)[0] if have_bits >= self.min_bits else 0
        end = e.prefix_bytes[bits - self.min_bits]
        if end <= start:
            return
        view = memoryview(out.numpy()).cast("B")[start:end]
        n = os.preadv(self._fd, [view], e.offset + start)
        # the bytes now live in `out`: keep no second copy in the page cache, which a memory cgroup charges to
        # this process (the lru policy re-reads experts every few tokens and thrashed at its limit)
        os.posix_fadvise(self._fd, e.offset + start, end - start, os.POSIX_FADV_DONTNEED)
        if n != end - start:
            raise StoreError(
                f"{self.experts_path}: short read for expert {expert} of layer {layer} "
                f"({n} of {end - start} bytes); the file is truncated"
            )
        for b in range(max(have_bits + 1, self.min_bits), bits + 1):
            s0, s1 = self.slice_range(layer, expert, b)
            if crc32(view[s0 - start : s1 - start]) != e.checksums[b - self.min_bits]:
                raise StoreError(
                    f"{self.experts_path}: checksum mismatch in expert {expert} of layer {layer} "
                    f"(bit slice {b}); the store is corrupted, re-run `d2moe convert`"
                )
        self.stats.bytes_read += end - start
        self.stats.reads += 1
        self.stats.by_bits[bits] = self.stats.by_bits.get(bits, 0) + end - start

    def read_expert(self, layer: int, expert: int, bits: int) -> torch.Tensor:
        """The b-bit prefix of one expert's blob as a fresh uint8 tensor."""
        out = torch.empty(self.prefix_bytes(layer, expert, bits), dtype=torch.uint8)
        self.read_into(layer, expert, out, self.min_bits - 1, bits)
        return out

    def total_expert_bytes(self, bits: int) -> int:
        self._check_bits(bits)
        return sum(e.prefix_bytes[bits - self.min_bits] for e in self._entries.values())

    def file_bytes(self) -> int:
        return sum(align_up(e.prefix_bytes[-1]) for e in self._entries.values())
