"""Decoder building blocks as pure functions over weight tensors (fp32 math for norms and softmax).

Shapes: B batch, T new tokens, S cached + new positions, H hidden, nH/nKV heads, D head dim.
Dense matrices are float tensors or per-row int8 (`dense.Int8Matrix`); `linear` and `embedding` take both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d2moe.config import ModelConfig
from d2moe.models.dense import DenseWeight, Int8Matrix, int8_embedding, int8_linear


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF-style RMSNorm: normalise in fp32, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference`; fp32 (the residual stream, always) goes through the fused op: one call instead
    of seven, ~8 us against ~11 us at T = 1, and a decode step runs 2 per layer."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)


def linear(x: torch.Tensor, w: DenseWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) in fp32 out, for a float matrix (computed in its dtype) or an `Int8Matrix`.

    A decode-step matvec is memory bound, so fewer weight bytes are less time (the default model's 49K x 576
    head on 2 cores, T = 1: fp32 6.9 ms, bf16 2.3 ms, fp16 1.2 ms, int8 0.8 ms), while the residual stream,
    norms and biases stay fp32. Prefill differs: fp16 GEMM has no fast CPU kernel (T = 128 through the head:
    fp16 154 ms, bf16 10 ms, int8 via bf16 chunks ~15-28 ms).
    """
    if isinstance(w, Int8Matrix):
        y = int8_linear(x, w)
    else:
        y = F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w).float()
    return y if b is None else y + b


def embedding(tokens: torch.Tensor, w: DenseWeight) -> torch.Tensor:
    """tokens [B,T] -> rows of the embedding [B,T,H] in fp32 (the residual stream's dtype)."""
    if isinstance(w, Int8Matrix):
        return int8_embedding(tokens, w)
    return F.embedding(tokens, w).float()


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU FFN: w2 @ (silu(w1 @ x) * (w3 @ x)); w1/w3 [I,H], w2 [H,I]."""
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


class Rope:
    """Precomputed rotary tables (HF rotate_half convention, default rope type)."""

    def __init__(self, head_dim: int, theta: float, max_position: int) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()  # [P, D]
        half = head_dim // 2
        self.cos_h = self.cos[:, None]  # [P, 1, D]: broadcast over heads in `rotate`
        self.sin_signed_h = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)[:, None]  # [P, 1, D]
        self.max_position = max_position

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Reference: x [B, nH, T, D], positions [T]."""
        cos = self.cos[positions].to(x.dtype)
        sin = self.sin[positions].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """`apply` at positions start.. on x [B, T, h, D] (heads after tokens, fp32), in three ops:
        rotate_half(x) = roll(x, D/2) with its first half negated, and that sign is folded into
        `sin_signed`; the tables are sliced, not gathered (positions are always a range)."""
        T = x.shape[1]
        cos, sin = self.cos_h[start : start + T], self.sin_signed_h[start : start + T]  # [T, 1, D]
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


class KVCache:
    """Static per-layer key/value buffers for one batch of sequences."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled (advanced by the decoder after all layers ran)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def _projections(
    x: torch.Tensor, w: dict[str, DenseWeight], prefix: str, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B,T,nH*D], k and v [B,T,nKV*D]: one matmul when the loader fused wq|wk|wv (`dense.fuse_qkv`)."""
    nH, nKV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    fused = w.get(prefix + "wqkv")
    if fused is not None:
        q, k, v = linear(x, fused, w.get(prefix + "bqkv")).split((nH * D, nKV * D, nKV * D), dim=-1)
        return q, k, v
    return (
        linear(x, w[prefix + "wq"], w.get(prefix + "bq")),
        linear(x, w[prefix + "wk"], w.get(prefix + "bk")),
        linear(x, w[prefix + "wv"], w.get(prefix + "bv")),
    )


def attention(
    x: torch.Tensor,
    w: dict[str, DenseWeight],
    prefix: str,
    cfg: ModelConfig,
    rope: Rope,
    cache: KVCache,
    layer: int,
) -> torch.Tensor:
    """Grouped-query attention with RoPE and optional q/k norm; writes new k/v into `cache`.

    A decode step runs this once per layer, so it is kept to few ops: q|k|v in one matmul when fused, q
    and k rotated together when no q/k norm sits between them, heads stay after tokens ([B,T,h,D]) and
    SDPA reads the transposed views."""
    B, T, _ = x.shape
    nH, nKV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    start = cache.length
    if start + T > cache.max_len:
        raise ValueError(f"sequence of {start + T} tokens exceeds the KV cache ({cache.max_len})")
    fused = w.get(prefix + "wqkv")
    if fused is not None and cfg.qk_norm == "none":
        qkv = linear(x, fused, w.get(prefix + "bqkv"))  # [B, T, (nH + 2 nKV) D]
        qk = rope.rotate(qkv[..., : (nH + nKV) * D].view(B, T, nH + nKV, D), start)
        q, k = qk[:, :, :nH], qk[:, :, nH:]  # [B, T, nH, D], [B, T, nKV, D]
        v = qkv[..., (nH + nKV) * D :].view(B, T, nKV, D)
    else:
        q, k, v = _projections(x, w, prefix, cfg)
        if cfg.qk_norm == "full":
            q = rms_norm(q, w[prefix + "q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, w[prefix + "k_norm"], cfg.rms_norm_eps)
        q, k, v = q.view(B, T, nH, D), k.view(B, T, nKV, D), v.view(B, T, nKV, D)
        if cfg.qk_norm == "head":
            q = rms_norm(q, w[prefix + "q_norm"], cfg.rms_norm_eps)
            k = rms_norm(k, w[prefix + "k_norm"], cfg.rms_norm_eps)
        q, k = rope.rotate(q, start), rope.rotate(k, start)
    cache.k[layer][:, :, start : start + T] = k.transpose(1, 2)
    cache.v[layer][:, :, start : start + T] = v.transpose(1, 2)
    keys = cache.k[layer][:, :, : start + T]  # [B, nKV, S, D]
    values = cache.v[layer][:, :, : start + T]
    if T == 1:
        mask = None
    else:  # causal over the new tokens, full view of the cached prefix
        mask = torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=nH != nKV)
    out = out.transpose(1, 2).reshape(B, T, nH * D)
    return linear(out, w[prefix + "wo"])
