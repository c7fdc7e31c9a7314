"""The I/O queue: loader threads read expert slices straight into cache slots, in priority order.

Reads use O_DIRECT (no page cache: a memory cgroup counts page cache, so buffered reads of a model larger
than the budget would thrash it) into the arena's page-aligned slots; every slice of a v2 store is a
4 KiB-aligned, 4 KiB-sized unit. Where O_DIRECT is refused (tmpfs, some filesystems) the loader falls back
to buffered reads followed by posix_fadvise(DONTNEED), and says so in `mode`. Each request is a Future;
CRC checks run on the loader thread, off the compute thread (storage/checksum.py; it releases the GIL,
as does preadv).
A short read, a checksum mismatch or an OS error fails that Future with a StoreError naming the expert;
nothing waits forever. The queue is a heap: the compute thread can raise a queued request's priority
(a prefetch that became a demand).
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from d2moe.storage.checksum import crc32
from d2moe.storage.format import StoreError

DIRECT_ALIGN = 4096


@dataclass(frozen=True)
class SliceRead:
    """Consecutive slices first_bits, first_bits + 1, ... of one expert: contiguous in the file, scattered
    into cache slots by one preadv; each slice checked against its CRC."""

    layer: int
    expert: int
    first_bits: int
    file_offset: int
    dests: tuple[torch.Tensor, ...]  # uint8 views of cache slots, one per slice, each exactly a slice long
    crcs: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(d.numel() for d in self.dests)

    @property
    def last_bits(self) -> int:
        return self.first_bits + len(self.dests) - 1


@dataclass
class _Job:
    read: SliceRead
    future: Future
    taken: bool = False


@dataclass
class LoaderStats:
    reads: int = 0
    bytes_read: int = 0
    busy_seconds: float = 0.0  # summed over loader threads
    events: list[tuple[float, float, int, int, int]] = field(default_factory=list)  # (t0, t1, layer, expert, bits)


def open_for_reading(path: str, direct: bool | None) -> tuple[int, bool]:
    """(fd, is_direct). direct=None tries O_DIRECT and falls back to buffered where it is refused."""
    if direct is not False and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if direct:
                raise StoreError(f"{path}: O_DIRECT refused ({e.strerror})") from e
        else:
            if _direct_read_works(fd):
                return fd, True
            os.close(fd)
            if direct:
                raise StoreError(f"{path}: O_DIRECT reads fail on this filesystem")
    try:
        return os.open(path, os.O_RDONLY), False
    except OSError as e:
        raise StoreError(f"{path}: cannot open ({e.strerror})") from e


def _direct_read_works(fd: int) -> bool:
    import mmap

    buf = mmap.mmap(-1, DIRECT_ALIGN)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        buf.close()


class SliceLoader:
    """A small pool of loader threads over one file. Use as a context manager or call close()."""

    def __init__(self, path: str, threads: int = 1, direct: bool | None = None, record: bool = False) -> None:
        if threads < 1:
            raise ValueError("the loader needs at least one thread")
        self.path = str(path)
        self.fd, self.direct = open_for_reading(self.path, direct)
        self.mode = "O_DIRECT" if self.direct else "buffered+fadvise(DONTNEED)"
        self.record = record
        self.stats = LoaderStats()
        self._heap: list[tuple[tuple, int, _Job]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"d2moe-loader-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def __enter__(self) -> SliceLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- compute-thread side ------------------------------------------------------------------------
    def submit(self, read: SliceRead, priority: tuple) -> Future:
        """Queue a read; lower `priority` tuples are read first."""
        if self.direct and (read.file_offset % DIRECT_ALIGN or any(
                d.numel() % DIRECT_ALIGN or d.data_ptr() % DIRECT_ALIGN for d in read.dests)):
            raise ValueError("O_DIRECT reads need 4 KiB-aligned offsets, sizes and buffers")
        job = _Job(read, Future())
        job.future.job = job  # type: ignore[attr-defined]  # lets bump() find the job
        with self._cv:
            if self._closed:
                raise RuntimeError("the loader is closed")
            heapq.heappush(self._heap, (priority, next(self._seq), job))
            self._cv.notify()
        return job.future

    def bump(self, future: Future, priority: tuple) -> None:
        """Read a queued request sooner (no effect once it started)."""
        job: _Job = future.job  # type: ignore[attr-defined]
        with self._cv:
            if not job.taken:
                heapq.heappush(self._heap, (priority, next(self._seq), job))
                self._cv.notify()

    def pending(self) -> int:
        with self._cv:
            return sum(1 for _, _, j in self._heap if not j.taken)

    def close(self) -> None:
        """Stop the threads (queued reads are cancelled, a running one finishes) and close the file."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            for _, _, job in self._heap:
                if not job.taken:
                    job.taken = True
                    if job.future.cancel():
                        job.future.set_running_or_notify_cancel()  # lets wait() on it return
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()
        os.close(self.fd)

    # --- loader threads -----------------------------------------------------------------------------
    def _next(self) -> _Job | None:
        with self._cv:
            while True:
                while self._heap:
                    _, _, job = heapq.heappop(self._heap)
                    if not job.taken:
                        job.taken = True
                        return job
                if self._closed:
                    return None
                self._cv.wait()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            t0 = time.perf_counter()
            try:
                self._read(job.read)
            except BaseException as e:  # noqa: BLE001 - every failure reaches the waiting compute thread
                job.future.set_exception(e)
            else:
                job.future.set_result(None)
            t1 = time.perf_counter()
            r = job.read
            with self._cv:
                self.stats.reads += 1
                self.stats.bytes_read += r.nbytes
                self.stats.busy_seconds += t1 - t0
                if self.record:
                    self.stats.events.append((t0, t1, r.layer, r.expert, r.last_bits))

    def _read(self, r: SliceRead) -> None:
        what = f"{self.path}: expert {r.expert} of layer {r.layer}, bit slices {r.first_bits}..{r.last_bits}"
        views = [memoryview(d.numpy()).cast("B") for d in r.dests]
        try:
            n = os.preadv(self.fd, views, r.file_offset)
        except OSError as e:
            raise StoreError(f"{what}: read failed ({e.strerror})") from e
        if not self.direct:
            os.posix_fadvise(self.fd, r.file_offset, r.nbytes, os.POSIX_FADV_DONTNEED)
        if n < r.nbytes:
            raise StoreError(f"{what}: short read ({n} of {r.nbytes} bytes); the file is truncated")
        for bits, view, crc in zip(range(r.first_bits, r.last_bits + 1), views, r.crcs):
            if crc32(view) != crc:
                raise StoreError(
                    f"{self.path}: expert {r.expert} of layer {r.layer}, bit slice {bits}: checksum mismatch; "
                    "the store is corrupted, re-run `d2moe convert`"
                )
