"""The store's slice checksum: CRC-32 (zlib's polynomial, so every store written so far stays valid).

The loader checks every slice it reads, and a memory-starved run re-reads its experts every few tokens: with
the standard library's crc32 (~4 GB/s here) that took a quarter of a core beside two compute threads on two
cores (bench8x at 25 %, `balanced`: 13.5 tok/s, 17.2 without the check). zlib-ng's vectorised crc32 gives the
same values at ~28 GB/s and releases the GIL like zlib's. Where zlib-ng is not installed the standard
library's is used: slower, same result.
"""

from __future__ import annotations

import zlib

try:
    from zlib_ng.zlib_ng import crc32 as _fast_crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; this keeps a bare install working
    _fast_crc32 = None


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 of `data`, as zlib.crc32 computes it."""
    return _fast_crc32(data) if _fast_crc32 is not None else zlib.crc32(data)


def crc32_reference(data: bytes | bytearray | memoryview) -> int:
    """The standard library's: the reference `crc32` is tested against."""
    return zlib.crc32(data)
