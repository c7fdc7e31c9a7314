"""Expert blob layout: round trips, prefixes are lower widths, zero-copy views over any buffer."""

from __future__ import annotations

import mmap
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.config import MWQConfig
from d2moe.quant import pack
from d2moe.quant.mwq import dequantize, quantize
from d2moe.quant.pack import ALIGN, ExpertLayout, dequantize_packed, pack_expert, pack_slice, unpack_expert


pytestmark = pytest.mark.usefixtures("one_thread")


def _expert(layout: ExpertLayout, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: quantize(torch.randn(o, i, generator=g) * 0.05, layout.cfg) for n, o, i in layout.shapes}


LAYOUTS = [
    ExpertLayout.swiglu(576, 192, MWQConfig(method="msb")),
    ExpertLayout.swiglu(576, 192, MWQConfig(method="residual")),
    ExpertLayout.swiglu(40, 24, MWQConfig(group_size=8, method="residual")),
    ExpertLayout((("a", 3, 40), ("b", 5, 16)), MWQConfig(group_size=8, method="msb", max_bits=5)),
    ExpertLayout((("w", 7, 96),), MWQConfig(group_size=32, method="residual", max_bits=3)),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l.cfg.method}-{l.shapes[0][1]}x{l.shapes[0][2]}")
def test_round_trip_every_width(layout: ExpertLayout) -> None:
    weights = _expert(layout)
    blob = pack_expert(layout, weights)
    assert len(blob) == layout.prefix_bytes(layout.cfg.max_bits)
    for b in layout.cfg.widths:
        views = unpack_expert(layout, blob, b)
        for name, q in weights.items():
            assert torch.equal(dequantize_packed(views[name], b), dequantize(q, b)), (name, b)


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=["msb", "residual", "odd"])
def test_a_prefix_is_the_lower_width_expert(layout: ExpertLayout) -> None:
    """Only the first prefix_bytes(b) bytes are needed, and they give the same b-bit weights."""
    weights = _expert(layout)
    blob = pack_expert(layout, weights)
    for b in layout.cfg.widths:
        full = unpack_expert(layout, blob, b)
        prefix = unpack_expert(layout, bytearray(blob[: layout.prefix_bytes(b)]), b)
        for name in weights:
            for lower in range(2, b + 1):
                assert torch.equal(dequantize_packed(prefix[name], lower), dequantize_packed(full[name], lower))


@settings(max_examples=15, deadline=None)
@given(
    out=st.integers(1, 9),
    groups=st.integers(1, 3),
    gs=st.sampled_from([8, 16, 64]),
    max_bits=st.integers(2, 8),
    method=st.sampled_from(["msb", "residual"]),
    seed=st.integers(0, 1000),
)
def test_round_trip_random_shapes(out: int, groups: int, gs: int, max_bits: int, method: str, seed: int) -> None:
    cfg = MWQConfig(group_size=gs, method=method, max_bits=max_bits)
    layout = ExpertLayout((("x", out, groups * gs), ("y", groups + 1, gs)), cfg)
    weights = _expert(layout, seed)
    blob = pack_expert(layout, weights)
    b = max_bits if seed % 2 else 2 + seed % (max_bits - 1)
    views = unpack_expert(layout, blob[: layout.prefix_bytes(b)], b)
    for name, q in weights.items():
        assert torch.equal(dequantize_packed(views[name], b), dequantize(q, b))


def test_sizes_and_alignment() -> None:
    for layout in LAYOUTS:
        weights = _expert(layout)
        total = 0
        for b in layout.cfg.widths:
            piece = pack_slice(layout, weights, b)
            assert len(piece) == layout.slice_bytes(b) and len(piece) % ALIGN == 0
            total += len(piece)
            assert total == layout.prefix_bytes(b)
    # msb stores no plane scales: each plane slice is exactly the bits (default expert: 3 * I * H / 8)
    msb = LAYOUTS[0]
    assert msb.slice_bytes(3) == 3 * 576 * 192 // 8
    # residual adds one fp16 scale per group and plane: w1, w3 [192, 9], w2 [576, 3]
    assert LAYOUTS[1].slice_bytes(3) == msb.slice_bytes(3) + 3 * (192 * 9 * 2)
    assert msb.slice_bytes(2) == 3 * (2 * 192 * 9 * 2 + 576 * 192 // 4)


def test_views_share_memory_with_every_buffer_kind() -> None:
    layout = LAYOUTS[1]
    blob = pack_expert(layout, _expert(layout))
    expect = dequantize_packed(unpack_expert(layout, blob, 8)["w2"], 8)
    ba = bytearray(blob)
    tensor = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    with tempfile.TemporaryFile() as f:
        f.write(blob)
        f.flush()
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        for buf in (blob, ba, memoryview(ba), mm, tensor):
            views = unpack_expert(layout, buf, 8)
            assert torch.equal(dequantize_packed(views["w2"], 8), expect)
        del views
        mm.close()
    # zero copy: writing into the buffer shows through the views
    views = unpack_expert(layout, tensor, 8)
    before = views["w1"].planes[0].clone()
    tensor[layout.array_offsets(3, "w1")["bits"]] ^= 0xFF
    assert not torch.equal(views["w1"].planes[0], before)


def test_bit_order_and_base_planes() -> None:
    """Column 8k + t is bit t of byte k; a row's base is its bit-0 plane, then its bit-1 plane."""
    bits = torch.zeros(1, 16, dtype=torch.bool)
    bits[0, 9] = True
    assert pack.pack_bits(bits).tolist() == [[0, 2]]
    assert torch.equal(pack.unpack_bits(pack.pack_bits(bits)), bits)
    layout = ExpertLayout((("w", 1, 16),), MWQConfig(group_size=16, max_bits=2))
    q = quantize(torch.arange(16.0)[None], layout.cfg)
    base = unpack_expert(layout, pack_expert(layout, {"w": q}), 2)["w"].base  # [1, 2, 2]
    code = pack.unpack_bits(base)[0]  # [2, 16]
    assert torch.equal(code[0].long() + 2 * code[1].long(), q.base[0].long())


def test_bad_inputs() -> None:
    layout = LAYOUTS[0]
    blob = pack_expert(layout, _expert(layout))
    with pytest.raises(ValueError, match="needs"):
        unpack_expert(layout, blob[: layout.prefix_bytes(4) - 1], 4)
    with pytest.raises(ValueError, match="bits"):
        layout.prefix_bytes(9)
    with pytest.raises(ValueError, match="even byte"):
        unpack_expert(layout, torch.frombuffer(bytearray(blob + b"\0"), dtype=torch.uint8)[1:], 2)
    with pytest.raises(ValueError, match="does not fit"):
        pack_expert(layout, {**_expert(layout), "w2": quantize(torch.randn(576, 128), layout.cfg)})
    with pytest.raises(ValueError, match="in %"):
        ExpertLayout((("w", 4, 40),), MWQConfig(group_size=16))
    with pytest.raises(ValueError, match="unique"):
        ExpertLayout((("w", 4, 64), ("w", 4, 64)), MWQConfig())
