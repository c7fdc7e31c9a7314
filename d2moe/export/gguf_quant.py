"""The llama.cpp tensor types of an export and the bytes of each tensor in them.

At b bits an msb (or gptq) expert group is a uniform grid: with s_i = s2 * 2^(1-i) and signs +-1
(quant/mwq.py), W_b = m + d*k for k in 0..2^b-1, d = s2 * 2^(2-b), m = z - s2 * (1/2 - 2^(1-b)).
Q4_1 and Q5_1 store exactly that per block of 32 weights (float16 d and m, a 4- or 5-bit k each), so at
2..5 bits the GGUF holds d2moe's own values (m rounded to float16 is the only change) whenever a store group
is a whole number of blocks. No llama.cpp type holds an asymmetric grid of 64..256 levels, so 6..8 bits
use Q8_0 (symmetric, amax/127 per block), which moves each weight by at most half a Q8_0 step. Residual
stores (fitted plane scales) are not uniform grids; they go through gguf's own Q4_1/Q5_1/Q8_0 rounding.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from d2moe.quant.pack import PackedMatrix, dequantize_packed

Q = gguf.GGMLQuantizationType
BLOCK = 32  # weights per Q4_1 / Q5_1 / Q8_0 block


def expert_type(bits: int) -> gguf.GGMLQuantizationType:
    """The type that holds b-bit experts: exactly up to 5 bits, re-rounded to 8 above."""
    return Q.Q4_1 if bits <= 4 else Q.Q5_1 if bits == 5 else Q.Q8_0


def file_type(qtype: gguf.GGMLQuantizationType) -> gguf.LlamaFileType:
    return {Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
            Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
            Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.F32: gguf.LlamaFileType.ALL_F32}[qtype]


def dense_type(dense_dtype: torch.dtype, shape: tuple[int, ...], keep_f32: bool) -> gguf.GGMLQuantizationType:
    """Vectors, norms and routers in F32 (as llama.cpp's converter keeps them); matrices as the store keeps
    them: F32 / F16 / BF16, and Q8_0 for int8 stores (per-row int8 re-rounded per block of 32)."""
    if keep_f32 or len(shape) < 2:
        return Q.F32
    if dense_dtype == torch.int8:
        return Q.Q8_0 if shape[-1] % BLOCK == 0 else Q.F16
    return {torch.float16: Q.F16, torch.bfloat16: Q.BF16}.get(dense_dtype, Q.F32)


def nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    return int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A float tensor in `qtype`: float arrays for F32/F16, gguf's packed uint8 rows otherwise."""
    a = t.detach().float().contiguous().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _grid_codes(pm: PackedMatrix, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(d, m) float16 per block [out, in/32] and codes k [out, in/32, 32] of an msb-layout matrix, or None
    when its groups are not whole blocks or it is not a uniform grid (residual)."""
    if pm.method != "msb" or pm.group_size % BLOCK:
        return None
    out, n_in = pm.out_features, pm.in_features
    s2, z = pm.base_scale.float(), pm.offset.float()
    rep = pm.group_size // BLOCK
    d = (s2 * 2.0 ** (2 - bits)).repeat_interleave(rep, dim=1).half()
    m = (z - s2 * (0.5 - 2.0 ** (1 - bits))).repeat_interleave(rep, dim=1).half()
    w = dequantize_packed(pm, bits).view(out, n_in // BLOCK, BLOCK)
    step = d.float()[..., None]
    k = torch.where(step > 0, torch.round((w - m.float()[..., None]) / step.clamp_min(1e-30)), 0.0)
    return d, m, k.clamp_(0, 2**bits - 1).to(torch.uint8)


def _pack_q4_1(d: torch.Tensor, m: torch.Tensor, k: torch.Tensor) -> np.ndarray:
    """Q4_1 block: d, m (float16), 16 bytes: weight j in the low nibble of byte j, weight j+16 in the high."""
    qs = k[..., :16] | (k[..., 16:] << 4)
    return _blocks(d, m, qs)


def _pack_q5_1(d: torch.Tensor, m: torch.Tensor, k: torch.Tensor) -> np.ndarray:
    """Q5_1 block: d, m, a uint32 of the 32 fifth bits (bit j for weight j), then Q4_1's nibbles."""
    qs = (k[..., :16] & 0x0F) | ((k[..., 16:] & 0x0F) << 4)
    high = ((k >> 4) & 1).to(torch.int64) << torch.arange(BLOCK)
    qh = high.sum(-1).to(torch.int64).numpy().astype("<u4").view(np.uint8).reshape(*k.shape[:-1], 4)
    return _blocks(d, m, torch.from_numpy(qh), qs)


def _blocks(d: torch.Tensor, m: torch.Tensor, *rest: torch.Tensor) -> np.ndarray:
    parts = [d.numpy().view(np.uint8).reshape(*d.shape, 2), m.numpy().view(np.uint8).reshape(*m.shape, 2)]
    parts += [r.numpy().astype(np.uint8) for r in rest]
    rows = np.concatenate(parts, axis=-1)  # [out, in/32, block bytes]
    return rows.reshape(rows.shape[0], -1)


def encode_expert(pm: PackedMatrix, bits: int, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """One expert matrix at `bits` in `qtype` ([out, row bytes] uint8): from its grid when exact, else
    dequantized and rounded by gguf."""
    if qtype in (Q.Q4_1, Q.Q5_1) and (grid := _grid_codes(pm, bits)) is not None:
        return (_pack_q4_1 if qtype == Q.Q4_1 else _pack_q5_1)(*grid)
    return encode(dequantize_packed(pm, bits), qtype)
