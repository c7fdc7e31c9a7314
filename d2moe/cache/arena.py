"""One memory arena, sized at start, that holds every cached expert slice: the budget is a real ceiling.

A store has exactly two slice sizes: the base slice (offsets, scales and 2-bit codes of an expert's
matrices) and a sign-plane slice (one bit per weight, plus scales for `residual`). So the arena is two
arrays of fixed-size slots, bases growing up from the bottom and planes growing down from the top, with
a movable boundary between them: no internal waste, no fragmentation inside a class, and the mix of
bases and planes follows the widths in use (all bases at 2 bits, six planes a base at 8 bits). A class
grows into the gap; when there is none it may take the other class's outermost slots once they are free.

The arena is an anonymous mmap: page-aligned, so O_DIRECT reads land in it directly, and untouched
pages cost no RSS. This module does no eviction; the plane cache decides what to free.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch

PAGE = 4096
BASE, PLANE = 0, 1  # slot classes


def pages(nbytes: int) -> int:
    return -(-nbytes // PAGE)


@dataclass(frozen=True)
class Slot:
    """A slot of one class: where it is in the arena. Slots are values; the arena tracks occupancy."""

    cls: int
    index: int  # BASE: counted from the bottom; PLANE: counted from the top
    start: int  # byte offset in the arena
    nbytes: int


class SlotArena:
    """Fixed-size base and plane slots over one preallocated buffer."""

    def __init__(self, nbytes: int, base_bytes: int, plane_bytes: int) -> None:
        if base_bytes % PAGE or plane_bytes % PAGE or base_bytes <= 0 or plane_bytes <= 0:
            raise ValueError("slot sizes must be positive multiples of 4 KiB")
        self.size = nbytes // PAGE * PAGE
        self.slot_bytes = (base_bytes, plane_bytes)
        self._mem = mmap.mmap(-1, max(self.size, PAGE))  # page aligned, zero-filled on first touch
        self.buffer = torch.frombuffer(self._mem, dtype=torch.uint8)[: self.size]
        self._used: list[list[bool]] = [[], []]  # per class: occupied flag per slot index
        self._free: list[list[int]] = [[], []]  # per class: free indices below the class's extent
        self.used_bytes = 0
        self.peak_bytes = 0

    # --- geometry -----------------------------------------------------------------------------------
    def extent(self, cls: int) -> int:
        """Bytes of the arena taken by class `cls` (its slots, used or free)."""
        return len(self._used[cls]) * self.slot_bytes[cls]

    @property
    def gap(self) -> int:
        return self.size - self.extent(BASE) - self.extent(PLANE)

    def capacity(self, cls: int) -> int:
        """How many slots of `cls` the whole arena could hold."""
        return self.size // self.slot_bytes[cls]

    def slot(self, cls: int, index: int) -> Slot:
        n = self.slot_bytes[cls]
        start = index * n if cls == BASE else self.size - (index + 1) * n
        return Slot(cls, index, start, n)

    def view(self, slot: Slot) -> torch.Tensor:
        return self.buffer[slot.start : slot.start + slot.nbytes]

    # --- allocation ---------------------------------------------------------------------------------
    def alloc(self, cls: int) -> Slot | None:
        """A free slot of `cls`, growing the class into the gap if needed; None if neither is possible."""
        if self._free[cls]:
            index = self._free[cls].pop()
        elif self.gap >= self.slot_bytes[cls]:
            index = len(self._used[cls])
            self._used[cls].append(False)
        else:
            return None
        self._used[cls][index] = True
        self.used_bytes += self.slot_bytes[cls]
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        return self.slot(cls, index)

    def release(self, slot: Slot) -> None:
        used = self._used[slot.cls]
        if slot.index >= len(used) or not used[slot.index]:
            raise ValueError(f"double free of {slot}")
        used[slot.index] = False
        self.used_bytes -= self.slot_bytes[slot.cls]
        self._free[slot.cls].append(slot.index)
        self._trim(slot.cls)

    def _trim(self, cls: int) -> None:
        """Give free outermost slots back to the gap, so the other class can grow."""
        used = self._used[cls]
        if used and not used[-1]:
            while used and not used[-1]:
                used.pop()
            n = len(used)
            self._free[cls] = [i for i in self._free[cls] if i < n]

    def blockers(self, cls: int) -> list[Slot] | None:
        """The other class's occupied outermost slots that must go (outermost first) before `cls` can grow
        by one slot; empty if it can grow now; None if it cannot even then. The boundary moves in order."""
        other = 1 - cls
        need = self.slot_bytes[cls] - self.gap
        out: list[Slot] = []
        i = len(self._used[other]) - 1
        while need > 0 and i >= 0:
            if self._used[other][i]:
                out.append(self.slot(other, i))
            need -= self.slot_bytes[other]
            i -= 1
        return out if need <= 0 else None

    def close(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        try:
            self._mem.close()
        except BufferError:  # views still alive elsewhere; the mapping goes when they do
            pass
