"""Slow, obviously-correct expert compute: dequantize to float32, then three F.linear calls."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from d2moe.quant.pack import PackedMatrix, dequantize_packed


def expert_ffn_reference(x: Tensor, packed: dict[str, PackedMatrix], bits: int) -> Tensor:
    """SwiGLU expert y = w2 @ (silu(w1 @ x) * (w3 @ x)) at `bits`, x [T, H] float32 -> [T, H]."""
    w1, w3, w2 = (dequantize_packed(packed[n], bits) for n in ("w1", "w3", "w2"))
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
