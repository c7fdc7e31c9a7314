"""Byte codes: a fully resident msb expert held as one byte per weight instead of eight bit-planes.

An msb matrix's b-bit weight is its 8-bit code's top b bits, so an expert whose 8 planes are all resident can
be held as the codes themselves, in the same bytes: the few-token kernel then loads 64 codes where it used to
rebuild them from 8 planes (~12 vector ops per 64 weights), and any width is still a prefix (mask the low
bits). The cache does this to experts it will never evict (every expert fits; see cache/plane_cache.py).

Layout, in place of the planes (so no memory is added): code bit 7 = base bit 1, bit 6 = base bit 0, bit
8 - i = plane i; rows [0, out/4) fill the base array ([out, 2, in/8] bytes), then out/8 rows fill each of
planes 3..8 ([out, in/8] bytes each), so out % 64 == 0. Each octet of rows (8 rows, 8 x in bytes) is stored
in the order the kernel reads (quant/kernels/mwq_octets.h): 512-byte chunks of 64 columns, each 16 runs of
32 bytes, run h holding the 8 rows' 4 codes at columns 4 * KQ_ORDER[h] + (0..3) as [row][4]. The kernel's
version is `mwq_to_codes` (mwq_cpu.cpp); the functions here are its torch reference and the way back to
planes for the torch paths. The conversion needs one matrix's codes (out x in bytes) as a transient buffer,
only in a cache that holds every expert anyway. Octets 2j and 2j + 1 in the same array are stored as a pair,
chunk by chunk interleaved (the kernel reads 16 rows as one stream); an octet whose partner is in another
array is stored alone. The offsets and base scales ([out, G] fp16) are kept per 16-row block as [G][16], lane
2i = row i of the block, lane 2i + 1 = row 8 + i (`to_lanes`), so the kernel loads a group's 16 rows at once.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from d2moe.quant.pack import PackedMatrix, pack_bits, unpack_bits


# the 4-column groups of a 64-column chunk in stored order (what the kernel's register transpose gives)
KQ_ORDER = (0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15)
ROWS_MULTIPLE = 64  # each plane holds out/8 rows, whole octets


def can_hold_codes(pm: PackedMatrix) -> bool:
    """msb views of all 8 planes, rows a multiple of 64 and columns of 64, not already codes."""
    return (pm.method == "msb" and pm.bits == 8 and pm.out_features % ROWS_MULTIPLE == 0
            and pm.in_features % 64 == 0 and not pm.codes)


ROWS_OF_LANES = tuple(i // 2 if i % 2 == 0 else 8 + i // 2 for i in range(16))


def _segment_rows(out: int) -> list[int]:
    """Rows per array of a matrix held as codes: the base array, then each of the 6 sign planes."""
    return [out // 4] + [out // 8] * 6


def _paired(out: int) -> list[bool]:
    """Per octet: stored interleaved with its partner (2j with 2j + 1) because both are in one array."""
    seg = [i for i, n in enumerate(_segment_rows(out)) for _ in range(n // 8)]
    return [(o ^ 1) < len(seg) and seg[o] == seg[o ^ 1] for o in range(len(seg))]


def to_octets(code: Tensor) -> Tensor:
    """Row-major codes [out, in] -> the stored order, as [out, in] (rows 8k..8k+7 hold octet k, or a pair
    2j, 2j + 1 spans rows 16j..16j+15)."""
    out, n_in = code.shape
    t = code.reshape(out // 8, 8, n_in // 64, 16, 4)[:, :, :, list(KQ_ORDER)]
    chunks = t.permute(0, 2, 3, 1, 4).reshape(out // 8, n_in // 64, 512)  # [octet, chunk, 512 bytes]
    stored = chunks.clone()
    paired = _paired(out)
    for o in range(0, out // 8, 2):
        if paired[o]:
            stored[o : o + 2] = chunks[o : o + 2].transpose(0, 1).reshape(2, n_in // 64, 512)
    return stored.reshape(out, n_in)


def from_octets(stored: Tensor) -> Tensor:
    """The inverse of to_octets."""
    out, n_in = stored.shape
    chunks = stored.reshape(out // 8, n_in // 64, 512).clone()
    paired = _paired(out)
    for o in range(0, out // 8, 2):
        if paired[o]:
            chunks[o : o + 2] = stored.reshape(out // 8, n_in // 64, 512)[o : o + 2].reshape(
                n_in // 64, 2, 512).transpose(0, 1)
    t = chunks.reshape(out // 8, n_in // 64, 16, 8, 4).permute(0, 3, 1, 2, 4)  # [octet, row, chunk, run, 4]
    code = torch.empty_like(t)
    code[:, :, :, list(KQ_ORDER)] = t
    return code.reshape(out, n_in)


def to_lanes(a: Tensor) -> Tensor:
    """[out, G] per-row scalars -> lane order, as [out, G] (see the module doc)."""
    out, g = a.shape
    return a.reshape(out // 16, 16, g)[:, list(ROWS_OF_LANES)].transpose(1, 2).reshape(out, g)


def from_lanes(a: Tensor) -> Tensor:
    """The inverse of to_lanes."""
    out, g = a.shape
    rows = torch.empty(out // 16, 16, g, dtype=a.dtype)
    rows[:, list(ROWS_OF_LANES)] = a.reshape(out // 16, g, 16).transpose(1, 2)
    return rows.reshape(out, g)


def codes_of(pm: PackedMatrix) -> Tensor:
    """uint8 [out, in] 8-bit msb codes of a planes matrix (8 planes)."""
    base = unpack_bits(pm.base).to(torch.uint8)  # [out, 2, in]
    code = base[:, 1] << 7 | base[:, 0] << 6
    for i in range(3, 9):
        code |= unpack_bits(pm.planes[i - 3]).to(torch.uint8) << (8 - i)
    return code


def _blocks(pm: PackedMatrix) -> list[Tensor]:
    """The code row blocks as [rows, in] views of the matrix's arrays, in row order."""
    n_in = pm.in_features
    return [pm.base.view(-1, n_in), *(p.view(-1, n_in) for p in pm.planes)]


def read_codes(pm: PackedMatrix) -> Tensor:
    """uint8 [out, in] codes (row-major) of a matrix held as codes."""
    return from_octets(torch.cat(_blocks(pm)))


def to_codes_reference(pm: PackedMatrix) -> PackedMatrix:
    """Hold `pm` as byte codes, in place (its arrays are overwritten); returns the views marked as codes."""
    if not can_hold_codes(pm):
        raise ValueError(f"{pm.name}: only 8-plane msb matrices with rows % {ROWS_MULTIPLE} == 0 and columns % 64 "
                         "== 0 can be held as codes")
    code, start = to_octets(codes_of(pm)), 0
    for block in _blocks(pm):
        block.copy_(code[start : start + block.shape[0]])
        start += block.shape[0]
    for a in (pm.offset, pm.base_scale):
        a.copy_(to_lanes(a))
    return replace(pm, codes=True)


def planes_from_codes(pm: PackedMatrix) -> PackedMatrix:
    """A planes matrix (new tensors) with the values of a matrix held as codes: what the torch paths read."""
    code = read_codes(pm)
    bit = [(code >> (7 - k) & 1).bool() for k in range(8)]  # most significant first: b1, b0, plane 3, ...
    base = torch.stack([pack_bits(bit[1]), pack_bits(bit[0])], dim=1)
    return replace(pm, offset=from_lanes(pm.offset), base_scale=from_lanes(pm.base_scale), base=base,
                   planes=tuple(pack_bits(bit[i - 1]) for i in range(3, 9)), codes=False)
