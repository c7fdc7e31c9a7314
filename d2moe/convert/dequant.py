"""Checkpoints stored quantized, dequantized once at conversion (then re-quantized into the bit-nested store
like any expert, or stored dense as --dense-dtype says).

MXFP4 (OCP Microscaling: FP4 E2M1 elements, one E8M0 scale per 32), GPT-OSS's experts. Per stored matrix
[out, in]: `blocks` uint8 [..., out, in/32, 16], two elements a byte, the low nibble first; `scales` uint8
[..., out, in/32], the block's power of two biased by 127.

Block FP8 (DeepSeek-V3's release): float8 e4m3 weights [out, in], one float32 `weight_scale_inv` per
block of [bo, bi] (128 x 128), w = fp8 * scale.
"""

from __future__ import annotations

import torch

# E2M1: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; codes 0..7 positive, 8..15 their negatives
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
BLOCK = 32


def e2m1_table() -> torch.Tensor:
    pos = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.cat((pos, -pos))  # [16]; code 8 is -0.0


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., R, G, 16], scales uint8 [..., R, G] -> float32 [..., R, G * 32]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    table = e2m1_table()
    b = blocks.to(torch.uint8).long()
    pairs = torch.stack((table[b & 0x0F], table[b >> 4]), dim=-1)  # [..., R, G, 16, 2]: low nibble first
    values = pairs.flatten(-2)  # [..., R, G, 32]
    values = torch.ldexp(values, (scales.to(torch.int32) - 127)[..., None])
    return values.flatten(-2)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., R, C] (C a multiple of 32) -> (blocks, scales), round to nearest; the inverse used by
    tests to build MXFP4 checkpoints. Each block's scale is the power of two that maps its largest
    magnitude to at most 6 (E2M1's largest)."""
    *lead, R, C = w.shape
    g = w.float().reshape(*lead, R, C // BLOCK, BLOCK)
    amax = g.abs().amax(-1).clamp(min=2.0**-126)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # [..., R, G]
    scaled = g / torch.ldexp(torch.ones_like(exp), exp.int())[..., None]
    table = e2m1_table()
    codes = (scaled[..., None] - table).abs().argmin(-1).to(torch.uint8)  # [..., R, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.to(torch.uint8), (exp + 127).to(torch.uint8)


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float8 [R, C] and scales [ceil(R/bo), ceil(C/bi)] -> float32 [R, C] (edge blocks may be partial)."""
    R, C = w.shape
    bo, bi = block
    if scale_inv.shape != (-(-R // bo), -(-C // bi)):
        raise ValueError(f"FP8 scales {tuple(scale_inv.shape)} do not tile a {R}x{C} weight in {bo}x{bi} blocks")
    s = scale_inv.float().repeat_interleave(bo, 0)[:R].repeat_interleave(bi, 1)[:, :C]
    return w.float() * s
