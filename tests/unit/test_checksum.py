"""The store's fast CRC-32 against the standard library's (the values every store holds)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.storage import checksum
from d2moe.storage.checksum import crc32, crc32_reference


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=10_000), st.integers(0, 64))
def test_fast_crc32_equals_zlib(data, cut):
    assert crc32(data) == crc32_reference(data)
    view = memoryview(data)[min(cut, len(data)):]  # a slice view, as the loader passes
    assert crc32(view) == crc32_reference(view)


def test_fast_path_is_in_use_and_large_buffers_agree():
    assert checksum._fast_crc32 is not None, "zlib-ng is a dependency: the fast CRC should be in use"
    big = bytes(range(256)) * 40_000  # 10 MB, past any small-buffer path
    assert crc32(big) == crc32_reference(big)
