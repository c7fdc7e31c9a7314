"""Byte layout of one expert blob: slices ordered by significance, so the b-bit expert is a prefix.

    blob = slice 2 | slice 3 | ... | slice max_bits
    slice 2 = for each matrix (layout order):  offset z  fp16 [out, G]
                                               base scale s2 fp16 [out, G]
                                               base codes uint8 [out, 2, in/8]
    slice i = for each matrix:                 plane scale s_i fp16 [out, G]   (residual only; msb derives
                                                                                s_i = s2 / 2^(i-1))
                                               plane i bits uint8 [out, in/8]

Every array starts on a multiple of ALIGN bytes (zero padding), so fp16 arrays are aligned views and each
row of bits can be loaded as whole words. Bits are little-endian: bit t of byte k (of a row) belongs to
column 8k + t, so 16 consecutive columns are one little-endian uint16, directly an AVX-512 lane mask.
The 2-bit base (2 bits per weight, the density of "4 codes per byte") is stored as its two bit-planes per
row: the first in/8 bytes of a row hold bit 0 of every code, the next in/8 bytes bit 1. The kernel then
treats base and sign planes alike (one mask per 16 columns per plane).

Sizes: slice 2 of a matrix = 2 * pad(out*G*2) + pad(out*in/4); slice i = pad(out*in/8) (+ pad(out*G*2)).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import torch
from torch import Tensor

from d2moe.config import MWQConfig
from d2moe.quant.mwq import NestedWeight, check_bits

ALIGN = 64  # bytes; every array of a blob starts on a multiple (a cache line)
Buffer = Union[bytes, bytearray, memoryview, Tensor, "mmap.mmap"]  # noqa: F821


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class PackedMatrix:
    """Zero-copy views of one matrix's arrays inside a blob prefix (float16 / uint8)."""

    name: str
    out_features: int
    in_features: int
    group_size: int
    method: str  # the layout: "msb" (plane scales derived) or "residual" (stored)
    bits: int  # widest width these views hold
    offset: Tensor  # [out, G] fp16
    base_scale: Tensor  # [out, G] fp16
    base: Tensor  # [out, 2, in/8] uint8: bit-planes 0 and 1 of the 2-bit code
    plane_scales: tuple[Tensor, ...]  # residual: [out, G] fp16 for planes 3..bits; msb: ()
    planes: tuple[Tensor, ...]  # [out, in/8] uint8 for planes 3..bits
    codes: bool = False  # base and planes hold byte codes instead (quant/codes.py)

    def __post_init__(self) -> None:
        out, n_in, n_g = self.out_features, self.in_features, self.in_features // self.group_size
        want = [(self.offset, torch.float16, (out, n_g)), (self.base_scale, torch.float16, (out, n_g))]
        want.append((self.base, torch.uint8, (out, 2, n_in // 8)))
        want += [(t, torch.float16, (out, n_g)) for t in self.plane_scales]
        want += [(t, torch.uint8, (out, n_in // 8)) for t in self.planes]
        for t, dtype, shape in want:
            if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
                got = f"{t.dtype} {tuple(t.shape)}"
                raise ValueError(f"{self.name}: expected a contiguous CPU {dtype} {shape} view, got {got}")
        n_planes = self.bits - 2
        if len(self.planes) != n_planes or len(self.plane_scales) != (n_planes if self.method == "residual" else 0):
            raise ValueError(f"{self.name}: {self.bits}-bit {self.method} views need {n_planes} planes")

    @cached_property
    def data_ptrs(self) -> tuple[int, ...]:
        """Addresses (offset, base_scale, base, plane scales..., planes...) for kernels; computed once."""
        return tuple(t.data_ptr() for t in (self.offset, self.base_scale, self.base, *self.plane_scales, *self.planes))

    def plane_scale(self, i: int) -> Tensor:
        """Float32 scale s_i [out, G] of plane i (derived by halving for msb)."""
        if self.method == "msb":
            return self.base_scale.float() * 2.0 ** (1 - i)
        return self.plane_scales[i - 3].float()


@dataclass(frozen=True)
class ExpertLayout:
    """Where every array of an expert's matrices lives in its blob."""

    shapes: tuple[tuple[str, int, int], ...]  # (name, out, in) in blob order
    cfg: MWQConfig
    slice_align: int = ALIGN  # every slice starts on a multiple (stores use 4 KiB: a slice is an O_DIRECT read)

    def __post_init__(self) -> None:
        if self.slice_align % ALIGN:
            raise ValueError(f"slice alignment {self.slice_align} must be a multiple of {ALIGN}")
        names = [s[0] for s in self.shapes]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"matrix names must be unique and non-empty: {names}")
        for name, out, n_in in self.shapes:
            if out <= 0 or n_in <= 0 or n_in % self.cfg.group_size:
                raise ValueError(f"{name}: shape ({out}, {n_in}) must be positive with in % {self.cfg.group_size} == 0")

    @classmethod
    def swiglu(cls, hidden: int, intermediate: int, cfg: MWQConfig, slice_align: int = ALIGN) -> ExpertLayout:
        """The canonical expert: w1 gate [I, H], w3 up [I, H], w2 down [H, I]."""
        shapes = (("w1", intermediate, hidden), ("w3", intermediate, hidden), ("w2", hidden, intermediate))
        return cls(shapes, cfg, slice_align)

    @cached_property
    def _table(self) -> dict[tuple[int, str], dict[str, int]]:
        """(bits, name) -> {array: byte offset} for the arrays slice `bits` adds, plus slice starts."""
        table: dict[tuple[int, str], dict[str, int]] = {}
        pos = 0
        for bits in range(2, self.cfg.max_bits + 1):
            for name, out, n_in in self.shapes:
                scal = _pad(out * (n_in // self.cfg.group_size) * 2)
                entry: dict[str, int] = {}
                if bits == 2:
                    entry["offset"], entry["base_scale"], entry["base"] = pos, pos + scal, pos + 2 * scal
                    pos += 2 * scal + _pad(out * n_in // 4)
                else:
                    if self.cfg.layout == "residual":
                        entry["scale"] = pos
                        pos += scal
                    entry["bits"] = pos
                    pos += _pad(out * n_in // 8)
                table[(bits, name)] = entry
            pos = -(-pos // self.slice_align) * self.slice_align
            table[(bits, "")] = {"end": pos}
        return table

    def array_offsets(self, bits: int, name: str) -> dict[str, int]:
        """Byte offsets of the arrays slice `bits` holds for matrix `name`: offset/base_scale/base (slice 2),
        scale (residual) and bits (slices 3..)."""
        check_bits(bits, self.cfg.max_bits)
        return dict(self._table[(bits, name)])

    def prefix_bytes(self, bits: int) -> int:
        """Bytes of slices 2..bits: what a `bits`-wide expert reads and caches."""
        check_bits(bits, self.cfg.max_bits)
        return self._table[(bits, "")]["end"]

    def slice_start(self, bits: int) -> int:
        """Byte offset of slice `bits` inside the blob (a multiple of slice_align)."""
        return self.prefix_bytes(bits - 1) if bits > 2 else 0

    def slice_bytes(self, bits: int) -> int:
        """Bytes of slice `bits` alone: what upgrading from bits-1 to bits reads."""
        return self.prefix_bytes(bits) - self.slice_start(bits)


# ----------------------------------------------------------------------------------------------- packing


def pack_bits(b: Tensor) -> Tensor:
    """bool [out, in] -> uint8 [out, in/8], column 8k + t at bit t of byte k."""
    out, n_in = b.shape
    weights = 1 << torch.arange(8, dtype=torch.int32)
    return (b.reshape(out, n_in // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor) -> Tensor:
    """uint8 [..., n/8] -> bool [..., n], inverse of pack_bits."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).bool().reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _fp16_bytes(t: Tensor) -> bytes:
    return t.to(torch.float16).numpy().tobytes()  # C order, whatever the strides


def _padded(chunks: list[bytes]) -> bytes:
    return b"".join(c + bytes(_pad(len(c)) - len(c)) for c in chunks)


def pack_slice(layout: ExpertLayout, weights: dict[str, NestedWeight], bits: int) -> bytes:
    """The bytes of slice `bits` (2..max_bits) of the expert's blob."""
    check_bits(bits, layout.cfg.max_bits)
    chunks: list[bytes] = []
    for name, out, n_in in layout.shapes:
        q = weights[name]
        if q.shape != (out, n_in) or q.group_size != layout.cfg.group_size or q.max_bits < layout.cfg.max_bits:
            raise ValueError(f"{name}: quantized {q.shape} g{q.group_size} {q.max_bits}b does not fit the layout")
        if bits == 2:
            base = torch.stack([pack_bits((q.base & 1).bool()), pack_bits((q.base >> 1).bool())], dim=1)
            chunks += [_fp16_bytes(q.offset), _fp16_bytes(q.base_scale), base.numpy().tobytes()]
        else:
            if layout.cfg.layout == "residual":
                chunks.append(_fp16_bytes(q.plane_scales[bits - 3]))
            chunks.append(pack_bits(q.planes[bits - 3]).numpy().tobytes())
    data = _padded(chunks)
    data += bytes(layout.slice_bytes(bits) - len(data))  # up to the slice alignment
    assert len(data) == layout.slice_bytes(bits)
    return data


def pack_expert(layout: ExpertLayout, weights: dict[str, NestedWeight]) -> bytes:
    """The full blob (all slices); its first prefix_bytes(b) bytes are the b-bit expert."""
    return b"".join(pack_slice(layout, weights, b) for b in layout.cfg.widths)


# --------------------------------------------------------------------------------------------- unpacking


def as_uint8(buf: Buffer) -> Tensor:
    """A flat uint8 tensor sharing memory with `buf` (read-only buffers are shared too, never written)."""
    if isinstance(buf, Tensor):
        if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError("a tensor buffer must be a contiguous 1-D uint8 tensor")
        return buf
    with warnings.catch_warnings():  # read-only bytes/mmap: we only ever read the views
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=torch.uint8)


def unpack_expert(layout: ExpertLayout, buf: Buffer, bits: int) -> dict[str, PackedMatrix]:
    """Views of the `bits`-wide expert inside `buf` (length >= prefix_bytes(bits)); no copy."""
    need = layout.prefix_bytes(bits)
    raw = as_uint8(buf)
    if raw.numel() < need:
        raise ValueError(f"buffer holds {raw.numel()} bytes, a {bits}-bit expert needs {need}")
    slices = [raw[layout.slice_start(b) : layout.prefix_bytes(b)] for b in range(2, bits + 1)]
    return unpack_slices(layout, slices)


def unpack_slices(layout: ExpertLayout, slices: list[Buffer]) -> dict[str, PackedMatrix]:
    """Views of the expert whose slices 2, 3, ... are `slices` (each its own buffer, e.g. a cache slot;
    the width is len(slices) + 1); no copy. The contiguous blob prefix is the special case above."""
    return assemble_expert(layout, [slice_arrays(layout, b, buf) for b, buf in zip(range(2, len(slices) + 2), slices)])


SliceArrays = dict[str, dict[str, Tensor]]  # matrix name -> {"offset", "base_scale", "base"} or {"scale"?, "bits"}


def slice_arrays(layout: ExpertLayout, bits: int, buf: Buffer) -> SliceArrays:
    """Typed views of the arrays of slice `bits` held in `buf`. A cache slot always holds a slice of the same
    kind at the same place, so these views can be made once per slot and reused for whatever it holds."""
    check_bits(bits, layout.cfg.max_bits)
    raw = as_uint8(buf)
    if raw.numel() < layout.slice_bytes(bits):
        raise ValueError(f"slice {bits} buffer holds {raw.numel()} bytes, it needs {layout.slice_bytes(bits)}")
    if raw.storage_offset() % 2 or raw.data_ptr() % 2:
        raise ValueError("slice buffers must start on an even byte (float16 views); store slices are 4 KiB aligned")
    gs, start = layout.cfg.group_size, layout.slice_start(bits)
    out: SliceArrays = {}
    for name, rows, n_in in layout.shapes:
        table = layout._table[(bits, name)]

        def at(key: str, n: int, table: dict = table) -> Tensor:
            return raw[table[key] - start : table[key] - start + n]

        scale_bytes = rows * (n_in // gs) * 2
        if bits == 2:
            arrays = {
                "offset": at("offset", scale_bytes).view(torch.float16).view(rows, n_in // gs),
                "base_scale": at("base_scale", scale_bytes).view(torch.float16).view(rows, n_in // gs),
                "base": at("base", rows * n_in // 4).view(rows, 2, n_in // 8),
            }
        else:
            arrays = {"bits": at("bits", rows * n_in // 8).view(rows, n_in // 8)}
            if "scale" in table:
                arrays["scale"] = at("scale", scale_bytes).view(torch.float16).view(rows, n_in // gs)
        out[name] = arrays
    return out


def assemble_expert(layout: ExpertLayout, slices: list[SliceArrays]) -> dict[str, PackedMatrix]:
    """The expert at width len(slices) + 1 from the views of its slices 2, 3, ..."""
    bits = len(slices) + 1
    check_bits(bits, layout.cfg.max_bits)
    out_m: dict[str, PackedMatrix] = {}
    for name, rows, n_in in layout.shapes:
        base = slices[0][name]
        planes = [s[name] for s in slices[1:]]
        out_m[name] = PackedMatrix(
            name=name,
            out_features=rows,
            in_features=n_in,
            group_size=layout.cfg.group_size,
            method=layout.cfg.layout,
            bits=bits,
            offset=base["offset"],
            base_scale=base["base_scale"],
            base=base["base"],
            plane_scales=tuple(p["scale"] for p in planes if "scale" in p),
            planes=tuple(p["bits"] for p in planes),
        )
    return out_m


def dequantize_packed(pm: PackedMatrix, bits: int) -> Tensor:
    """Reference reconstruction from packed views, float32 [out, in]; equals mwq.dequantize(q, bits)."""
    check_bits(bits, pm.bits)
    if pm.codes:
        from d2moe.quant.codes import planes_from_codes  # codes.py builds on this module

        pm = planes_from_codes(pm)
    out, n_in, gs = pm.out_features, pm.in_features, pm.group_size

    def expand(t: Tensor) -> Tensor:  # [out, G] -> [out, in]
        return t.float()[:, :, None].expand(out, n_in // gs, gs).reshape(out, n_in)

    code = unpack_bits(pm.base).to(torch.float32)  # [out, 2, in]
    w = expand(pm.offset) + expand(pm.base_scale) * (code[:, 0] + 2 * code[:, 1])
    for i in range(3, bits + 1):
        sigma = unpack_bits(pm.planes[i - 3]).to(torch.float32) * 2 - 1
        w = w + expand(pm.plane_scale(i)) * sigma
    return w
