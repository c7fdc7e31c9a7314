"""Byte codes: a fully resident msb expert held as one byte per weight instead of eight bit-planes.

An msb matrix's b-bit weight is its 8-bit code's top b bits, so an expert whose 8 planes are all resident can
be held as the codes themselves, in the same bytes: the few-token kernel then loads 64 codes where it used to
rebuild them from 8 planes (~12 vector ops per 64 weights), and any width is still a prefix (mask the low
bits). The cache does this to experts it will never evict (every expert fits; see cache/plane_cache.py).

Layout, in place of the planes (so no memory is added): code bit 7 = base bit 1, bit 6 = base bit 0, bit
8 - i = plane i; rows [0, out/4) fill the base array ([out, 2, in/8] bytes), then out/8 rows fill each of
planes 3..8 ([out, in/8] bytes each). The kernel's version is `mwq_to_codes` (mwq_cpu.cpp); the functions
here are its torch reference and the way back to planes for the torch paths. The conversion needs one
matrix's codes (out x in bytes) as a transient buffer, only in a cache that holds every expert anyway.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from d2moe.quant.pack import PackedMatrix, pack_bits, unpack_bits


def can_hold_codes(pm: PackedMatrix) -> bool:
    """msb views of all 8 planes, rows a multiple of 8, not already codes."""
    return pm.method == "msb" and pm.bits == 8 and pm.out_features % 8 == 0 and not pm.codes


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
    """uint8 [out, in] codes of a matrix held as codes."""
    return torch.cat(_blocks(pm))


def to_codes_reference(pm: PackedMatrix) -> PackedMatrix:
    """Hold `pm` as byte codes, in place (its arrays are overwritten); returns the views marked as codes."""
    if not can_hold_codes(pm):
        raise ValueError(f"{pm.name}: only 8-plane msb matrices with rows % 8 == 0 can be held as codes")
    code, start = codes_of(pm), 0
    for block in _blocks(pm):
        block.copy_(code[start : start + block.shape[0]])
        start += block.shape[0]
    return replace(pm, codes=True)


def planes_from_codes(pm: PackedMatrix) -> PackedMatrix:
    """A planes matrix (new tensors) with the values of a matrix held as codes: what the torch paths read."""
    code = read_codes(pm)
    bit = [(code >> (7 - k) & 1).bool() for k in range(8)]  # most significant first: b1, b0, plane 3, ...
    base = torch.stack([pack_bits(bit[1]), pack_bits(bit[0])], dim=1)
    return replace(pm, base=base, planes=tuple(pack_bits(bit[i - 1]) for i in range(3, 9)), codes=False)
