"""Multi-head latent attention (DeepSeek-V2/V3), computed in the latent space so only the latent is cached.

Per token, MLA compresses the hidden state x [H] into a key/value latent and one shared rotary key:

    c_kv | k_rope = x @ wkv_a.T             c_kv [r] (RMS-normed), k_rope [dr] (RoPE, shared by all heads)
    q = wq x  or  wq_b(norm(wq_a x))        per head h: q_nope [dn] | q_rope [dr]
    k_h = (W_uk[h] c_kv) | k_rope           W_uk[h] [dn, r], W_uv[h] [dv, r]: head h's rows of wkv_b
    v_h =  W_uv[h] c_kv

Since q_nope . (W_uk c) = (W_uk^T q_nope) . c, each head's query is absorbed into the latent
(q_lat = W_uk[h]^T q_nope [r]) and attention runs as multi-query attention over the cached
[c_kv | k_rope] (one "head" of r + dr dims) with the latent itself as the value; head h's output is then
W_uv[h] applied to its attended latent. The cache holds r + dr numbers per position and layer instead of
nH * (dn + dr + dv) (DeepSeek-V3: 576 against 40,960), which is what a memory-starved device needs; the
math is the same as expanding keys and values, in another order.

Rotary dims: DeepSeek's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ...; conversion permutes
those rows of wq / wq_b / wkv_a to halves (convert/families.py), so the one rotate_half `Rope` serves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from d2moe.config import ModelConfig
from d2moe.models.dense import DenseWeight, Int8Matrix, dequantize_int8
from d2moe.models.layers import KVCache, Linear, Rope, causal_mask, linear, rms_norm


def _query(x: torch.Tensor, w: dict[str, DenseWeight], p: str, cfg: ModelConfig, lin: Linear) -> torch.Tensor:
    """x [..., H] -> q [..., nH*(dn+dr)]: full projection, or low rank with a norm between."""
    if cfg.q_lora_rank:
        q_a = rms_norm(lin(x, w[p + "wq_a"], w.get(p + "bq_a")), w[p + "q_a_norm"], cfg.latent_eps)
        return lin(q_a, w[p + "wq_b"])
    return lin(x, w[p + "wq"])


def up_projection(w: DenseWeight, cfg: ModelConfig) -> torch.Tensor:
    """wkv_b [nH*(dn+dv), r] as [nH, dn+dv, r] (a view; int8 stores keep it float, see dense.wants_int8)."""
    m = dequantize_int8(w) if isinstance(w, Int8Matrix) else w
    return m.view(cfg.num_heads, cfg.head_dim - cfg.qk_rope_head_dim + cfg.value_dim, cfg.kv_lora_rank)


def mla_rows(x: torch.Tensor, w: dict[str, DenseWeight], prefix: str, cfg: ModelConfig, rope: Rope,
             at: int | torch.Tensor, lin: Linear = linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row-wise part of MLA: x [B,T,H] at positions `at` (the first, or one per token, see
    `layers.positioned`) -> q_nope [B,T,nH,dn], q_rope [B,T,nH,dr] (rotated) and the tokens' cache entries
    c_kv | k_rope [B,T,r+dr]. `lin` computes each matrix (a batched step's row-invariant calls)."""
    B, T, _ = x.shape
    nH, r, dr = cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    dn = cfg.head_dim - dr
    q = _query(x, w, prefix, cfg, lin).view(B, T, nH, dn + dr)
    q_nope, q_rope = q[..., :dn], rope.rotate_from(q[..., dn:], at)  # [B,T,nH,dn], [B,T,nH,dr]
    kv = lin(x, w[prefix + "wkv_a"], w.get(prefix + "bkv_a"))  # [B, T, r + dr]
    c_kv = rms_norm(kv[..., :r], w[prefix + "kv_a_norm"], cfg.latent_eps)  # [B, T, r]
    k_rope = rope.rotate_from(kv[..., r:].reshape(B, T, 1, dr), at)  # [B, T, 1, dr]
    return q_nope, q_rope, torch.cat((c_kv, k_rope[:, :, 0]), dim=-1)


def mla_attend(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, up: torch.Tensor,
               cfg: ModelConfig, start: int) -> torch.Tensor:
    """The per-sequence core of MLA, after the new latents are cached: the tokens at positions start..
    (q_nope [B,T,nH,dn], q_rope [B,T,nH,dr]) against latent [B,1,start+T,r+dr], up = `up_projection`
    -> heads' outputs [B,T,nH*dv] (before wo). The single-request decoder calls it on its batch, a batched
    step once per sequence (models/ragged.py)."""
    B, T, nH, dn = q_nope.shape
    r = cfg.kv_lora_rank
    q_lat = torch.einsum("bthd,hdr->bhtr", q_nope.to(up.dtype), up[:, :dn]).float()  # [B, nH, T, r]
    query = torch.cat((q_lat, q_rope.transpose(1, 2)), dim=-1)  # [B, nH, T, r + dr]
    mask = causal_mask(T, start)
    out = F.scaled_dot_product_attention(query, latent, latent[..., :r], attn_mask=mask, scale=cfg.attn_scale,
                                         enable_gqa=nH > 1)  # [B, nH, T, r]
    heads = torch.einsum("bhtr,hvr->bthv", out.to(up.dtype), up[:, dn:]).float()  # [B, T, nH, dv]
    return heads.reshape(B, T, nH * cfg.value_dim)


def mla_attention(
    x: torch.Tensor,
    w: dict[str, DenseWeight],
    prefix: str,
    cfg: ModelConfig,
    rope: Rope,
    cache: KVCache,
    layer: int,
) -> torch.Tensor:
    """x [B,T,H] -> [B,T,H]; appends each token's latent c_kv | k_rope to `cache` (one head, r + dr dims)."""
    T = x.shape[1]
    start = cache.length
    if start + T > cache.max_len:
        raise ValueError(f"sequence of {start + T} tokens exceeds the KV cache ({cache.max_len})")
    q_nope, q_rope, entries = mla_rows(x, w, prefix, cfg, rope, start)
    cache.k[layer][:, 0, start : start + T] = entries
    heads = mla_attend(q_nope, q_rope, cache.k[layer][:, :, : start + T], up_projection(w[prefix + "wkv_b"], cfg),
                       cfg, start)
    return linear(heads, w[prefix + "wo"], w.get(prefix + "bo"))
