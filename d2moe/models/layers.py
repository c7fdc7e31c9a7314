"""Decoder building blocks as pure functions over weight tensors (fp32 math for norms and softmax).

Shapes: B batch, T new tokens, S cached + new positions, H hidden, nH/nKV heads, D head dim.
Dense matrices are float tensors, int8 (`dense.Int8Matrix`) or either held as blocks for d2moe's kernels
(`dense.Float16Blocks`, `dense.Int8Blocks`); `linear` and `embedding` take them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from d2moe.config import ModelConfig, RopeScaling
from d2moe.models.dense import (
    DenseWeight,
    Int8Blocks,
    Int8Matrix,
    int8_blocked_rows,
    int8_blocks_linear,
    int8_embedding,
    int8_linear,
)
from d2moe.models.dense_f16 import Float16Blocks, blocked_rows, float16_blocks_linear, float16_linear
from d2moe.models.kv_window import cache_len, is_ring, ring_write, window_keys
from d2moe.quant.kernels.cpu import load_kernel


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF-style RMSNorm: normalise in fp32, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference`. fp32 (the residual stream, always) goes through the kernel library's one-call
    norm (~3 us against ~11 us for torch's six-op composite at T = 1, 2 per layer per step), whatever the row
    count or layout, so a row's bits never depend on what shares the call (batch invariance); autograd
    (calibration) and machines without a compiler take `F.rms_norm`."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if not (x.requires_grad or weight.requires_grad) and (kernel := load_kernel()) is not None:
            return kernel.rms_norm(x.contiguous(), weight.contiguous(), eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return rms_norm_reference(x, weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm with bias in fp32 (PhiMoE); x [..., H]."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, eps)


def norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, cfg: ModelConfig) -> torch.Tensor:
    """The family's norm of x [..., H] with weights `name` (and `name`_b for LayerNorm's bias)."""
    if cfg.norm == "layer":
        return layer_norm(x, w[name], w[name + "_b"], cfg.rms_norm_eps)
    return rms_norm(x, w[name], cfg.rms_norm_eps)


def block_input(h: torch.Tensor, w: dict[str, torch.Tensor], name: str, cfg: ModelConfig) -> torch.Tensor:
    """What a block (attention or FFN) reads from the residual stream h: h normed by `name` (pre-norm), or h
    itself when the norm sits on the block's output (post_norm: FlexOlmo)."""
    return h if cfg.post_norm else norm(h, w, name, cfg)


def block_output(y: torch.Tensor, w: dict[str, torch.Tensor], name: str, cfg: ModelConfig) -> torch.Tensor:
    """What a block's output y adds to the residual stream: y normed by `name` (post_norm), or y scaled by
    the residual multiplier (Granite; 1 elsewhere)."""
    if cfg.post_norm:
        y = norm(y, w, name, cfg)
    return y if cfg.residual_multiplier == 1.0 else y * cfg.residual_multiplier


def linear(x: torch.Tensor, w: DenseWeight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) in fp32 out, for a float matrix (computed in its dtype) or an `Int8Matrix`.

    A decode-step matvec is memory bound, so fewer weight bytes are less time (the default model's 49K x 576
    head on 2 cores, T = 1: fp32 6.9 ms, bf16 2.3 ms, fp16 1.2 ms, int8 0.8 ms), while the residual stream,
    norms and biases stay fp32. fp16 and int8 run d2moe's kernels (models/dense.py).
    """
    if isinstance(w, Int8Matrix):
        y = int8_linear(x, w)
    elif isinstance(w, Float16Blocks):
        y = float16_blocks_linear(x, w)
    elif isinstance(w, Int8Blocks):
        y = int8_blocks_linear(x, w)
    elif w.dtype == torch.float16:
        y = float16_linear(x, w)
    else:
        y = F.linear(x if x.dtype == w.dtype else x.to(w.dtype), w).float()
    return y if b is None else y + b


# x [..., in], a matrix and an optional bias -> [..., out] fp32: `linear`, or a batched step's row-invariant calls
Linear = Callable[..., torch.Tensor]


def embedding(tokens: torch.Tensor, w: DenseWeight) -> torch.Tensor:
    """tokens [B,T] -> rows of the embedding [B,T,H] in fp32 (the residual stream's dtype)."""
    if isinstance(w, Int8Matrix):
        return int8_embedding(tokens, w)
    if isinstance(w, Float16Blocks):
        return blocked_rows(tokens, w)
    if isinstance(w, Int8Blocks):
        return int8_blocked_rows(tokens, w)
    return F.embedding(tokens, w).float()


def swiglu(x: torch.Tensor, w1: DenseWeight, w3: DenseWeight, w2: DenseWeight, lin: Linear = linear) -> torch.Tensor:
    """SwiGLU FFN: w2 @ (silu(w1 @ x) * (w3 @ x)); w1/w3 [I,H], w2 [H,I]. `lin` computes each matrix
    (a batched step's row-invariant `StepPlan.linear`)."""
    return lin(F.silu(lin(x, w1)) * lin(x, w3), w2)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's gated activation: gate clamped above and up both ways at `limit`, then
    (up + 1) * gate * sigmoid(alpha * gate). gate/up [T, I] -> [T, I]."""
    gate = gate.clamp(max=limit)
    up = up.clamp(-limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def yarn_inv_freq(inv_freq: torch.Tensor, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN frequencies (arXiv 2309.00071, "NTK-by-parts"): pair i of a D-dim head turns at inv_freq[i]
    rad/token, i.e. r_i = L / (2 pi / inv_freq[i]) times over the original context L. Pairs turning more
    than beta_fast times keep their frequency, pairs turning fewer than beta_slow times are interpolated
    (divided by `factor`), and a linear ramp over pair index blends the two in between. The pair index at
    which r_i = r is D ln(L / (2 pi r)) / (2 ln theta)."""
    D = 2 * inv_freq.numel()

    def pair_at(rotations: float) -> float:
        return D * math.log(s.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = pair_at(s.beta_fast), pair_at(s.beta_slow)
    if s.truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, D - 1)
    if lo == hi:
        hi += 0.001  # a step instead of a ramp
    ramp = ((torch.arange(D // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)  # 0: keep, 1: interpolate
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3 scaling: frequencies whose wavelength exceeds original / low_freq_factor are divided by
    `factor`, those shorter than original / high_freq_factor kept, and in between blended linearly in
    original / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = s.original_max_position / wavelength
    smooth = ((ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    long = wavelength > s.original_max_position / s.low_freq_factor
    short = wavelength < s.original_max_position / s.high_freq_factor
    return torch.where(long, inv_freq / s.factor, torch.where(short, inv_freq, blended))


class Rope:
    """Precomputed rotary tables (HF rotate_half convention; plain or YaRN-scaled)."""

    def __init__(self, head_dim: int, theta: float, max_position: int, scaling: RopeScaling | None = None) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if scaling is not None and scaling.kind == "yarn":
            inv_freq = yarn_inv_freq(inv_freq, theta, scaling)
        elif scaling is not None and scaling.kind == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, scaling)
        elif scaling is not None:  # longrope
            inv_freq = inv_freq / torch.tensor(scaling.dim_factors, dtype=torch.float32)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()  # [P, D]
        if scaling is not None and scaling.attention_factor != 1.0:
            self.cos, self.sin = self.cos * scaling.attention_factor, self.sin * scaling.attention_factor
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

    def rotate_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`rotate` with a position per token: x [B, T, h, D], positions [T] (a batched step's rows belong
        to several sequences); the tables are gathered, the arithmetic is `rotate`'s."""
        cos, sin = self.cos_h[positions], self.sin_signed_h[positions]  # [T, 1, D]
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)

    def rotate_from(self, x: torch.Tensor, at: int | torch.Tensor) -> torch.Tensor:
        """`rotate` from position `at` (an int), or `rotate_at` positions `at` (a tensor)."""
        return self.rotate(x, at) if isinstance(at, int) else self.rotate_at(x, at)


def kv_cache_dims(cfg: ModelConfig) -> tuple[int, int, int]:
    """(heads, key dims, value dims) cached per position and layer. MLA caches its compressed latent
    c_kv | k_rope as one head whose first kv_lora_rank dims are also the values: no value buffer."""
    if cfg.attention == "mla":
        return 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, 0
    return cfg.num_kv_heads, cfg.head_dim, cfg.head_dim


class KVCache:
    """Static per-layer key/value buffers for one batch of sequences; a sliding or chunked layer keeps only
    its span, as a ring (models/kv_window.py)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        heads, k_dim, v_dim = kv_cache_dims(cfg)
        lens = [cache_len(cfg, L, max_len) for L in range(cfg.num_layers)]
        self.k = [torch.zeros((batch, heads, n, k_dim), dtype=dtype) for n in lens]
        self.v = [torch.zeros((batch, heads, n, v_dim), dtype=dtype) for n in lens]
        self.max_len = max_len
        self.length = 0  # positions filled (advanced by the decoder after all layers ran)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def causal_mask(T: int, start: int, window: int = 0, always: bool = False, chunk: int = 0,
                key_pos: torch.Tensor | None = None) -> torch.Tensor | None:
    """[T, S] bool, True = attend: causal over the T new tokens, full view of the cached prefix; with
    a sliding `window` only the last `window` positions up to each query's own; with `chunk` only the
    positions of the query's chunk (Llama 4). Keys are positions 0..start+T-1, or `key_pos` [S] (a ring's,
    kv_window.py). None when that is everything (one token over the plain layout, unless `always`)."""
    S = start + T
    if key_pos is None and T == 1 and not always and (window == 0 or S <= window) and (chunk == 0 or S <= chunk):
        return None
    query = torch.arange(start, S)[:, None]  # absolute positions
    key = (torch.arange(S) if key_pos is None else key_pos)[None, :]
    mask = key <= query
    if window:
        mask = mask & (key > query - window)
    if chunk:
        mask = mask & (key // chunk == query // chunk)
    return mask


def positioned(q: torch.Tensor, k: torch.Tensor, cfg: ModelConfig, rope: Rope, at: int | torch.Tensor, layer: int,
               w: dict[str, DenseWeight] | None = None, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on q [B,T,nH,D] and k [B,T,nKV,D] at positions `at` (the first, an int; or one per token, a
    tensor [T]): all dims, or the leading rope_dim (GLM); then Llama 4's weightless q/k norm, or HunYuan's
    per-head one with weights (`w`'s `prefix`q_norm / k_norm: it normalizes after RoPE). Llama 4's NoPE
    layers skip both and scale q by a temperature growing with the position (arXiv 2501.19399)."""
    if layer in cfg.nope_layers:
        if cfg.temperature_floor:
            pos = (torch.arange(at, at + q.shape[1], dtype=torch.float32) if isinstance(at, int)
                   else at.to(torch.float32))
            scale = torch.log1p(torch.floor((pos + 1.0) / cfg.temperature_floor)) * cfg.temperature_scale + 1.0
            q = q * scale[:, None, None]  # [T, 1, 1]
        return q, k
    r = cfg.rope_dim
    if r < q.shape[-1]:  # partial rotary: rotate the leading dims of each head, pass the rest
        q = torch.cat((rope.rotate_from(q[..., :r], at), q[..., r:]), dim=-1)
        k = torch.cat((rope.rotate_from(k[..., :r], at), k[..., r:]), dim=-1)
    else:
        q, k = rope.rotate_from(q, at), rope.rotate_from(k, at)
    if cfg.qk_norm == "l2":
        q = F.rms_norm(q, (q.shape[-1],), eps=cfg.rms_norm_eps)
        k = F.rms_norm(k, (k.shape[-1],), eps=cfg.rms_norm_eps)
    elif cfg.qk_norm == "head_rope":
        if w is None:
            raise ValueError("qk_norm='head_rope' needs the layer's q_norm / k_norm weights")
        q = rms_norm(q.contiguous(), w[prefix + "q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k.contiguous(), w[prefix + "k_norm"], cfg.rms_norm_eps)
    return q, k


def attend_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float, mask: torch.Tensor
) -> torch.Tensor:
    """Softmax attention where each head also weighs a learned sink logit that carries no value (GPT-OSS):
    p_j = exp(s_j) / (exp(sink) + sum_i exp(s_i)). q [B,nH,T,D], k/v [B,nKV,S,D], sinks [nH],
    mask [T,S] (True = attend) -> [B,nH,T,D]."""
    B, nH, T, _ = q.shape
    rep = nH // k.shape[1]
    k = k.repeat_interleave(rep, dim=1) if rep > 1 else k  # [B, nH, S, D]
    v = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, nH, T, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, nH, 1, 1).expand(B, nH, T, 1)
    probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]  # the sink's share is dropped
    return probs @ v


def qkv_heads(
    x: torch.Tensor, w: dict[str, DenseWeight], prefix: str, cfg: ModelConfig, lin: Linear = linear
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row-wise part of attention: x [..., H] -> q [..., nH, D], k and v [..., nKV, D], q/k normed
    (over all heads or per head) but not yet positioned. One matmul when the loader fused wq|wk|wv
    (`dense.fuse_qkv`). `lin` computes each matrix (a batched step's row-invariant calls)."""
    nH, nKV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    fused = w.get(prefix + "wqkv")
    if fused is not None:
        q, k, v = lin(x, fused, w.get(prefix + "bqkv")).split((nH * D, nKV * D, nKV * D), dim=-1)
    else:
        q = lin(x, w[prefix + "wq"], w.get(prefix + "bq"))
        k = lin(x, w[prefix + "wk"], w.get(prefix + "bk"))
        v = lin(x, w[prefix + "wv"], w.get(prefix + "bv"))
    if cfg.qk_norm == "full":
        q = rms_norm(q, w[prefix + "q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w[prefix + "k_norm"], cfg.rms_norm_eps)
    lead = x.shape[:-1]
    q, k, v = q.view(*lead, nH, D), k.view(*lead, nKV, D), v.view(*lead, nKV, D)
    if cfg.qk_norm == "head":
        q = rms_norm(q, w[prefix + "q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w[prefix + "k_norm"], cfg.rms_norm_eps)
    return q, k, v


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, w: dict[str, DenseWeight], prefix: str,
           cfg: ModelConfig, start: int, layer: int, key_pos: torch.Tensor | None = None) -> torch.Tensor:
    """The per-sequence core of attention, after the new keys and values are cached: q [B,T,nH,D] (the
    tokens at positions start.., positioned) against keys/values [B,nKV,start+T,D] (or [B,nKV,S,D] at
    positions `key_pos`: a ring's, kv_window.py) with the layer's mask (causal; sliding window or chunk) and
    softmax (SDPA, or with sinks) -> [B,T,nH*D]. The single-request decoder calls it on its batch, a batched
    step once per sequence (models/ragged.py)."""
    B, T, nH, _ = q.shape
    window = cfg.sliding_window if layer in cfg.sliding_layers else 0
    chunk = cfg.attention_chunk if layer in cfg.chunked_layers else 0
    if cfg.attention_sinks:
        out = attend_with_sinks(q.transpose(1, 2), keys, values, w[prefix + "sinks"], cfg.attn_scale,
                                causal_mask(T, start, window, always=True, chunk=chunk, key_pos=key_pos))
    else:
        mask = causal_mask(T, start, window, chunk=chunk, key_pos=key_pos)
        if T == 1 and mask is None and (out := _decode_kernel(q, keys, values, cfg)) is not None:
            return out
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                             enable_gqa=nH != keys.shape[1], scale=cfg.softmax_scale or None)
    return out.transpose(1, 2).reshape(B, T, -1)


def _decode_kernel(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cfg: ModelConfig) -> torch.Tensor | None:
    """One new token per sequence that sees its whole cache: d2moe's decode-attention kernel (the batched
    step's, models/ragged.py) instead of SDPA's per-call dispatch; None where it does not apply."""
    B = q.shape[0]
    out = decode_attention(q[:, 0], keys, values, torch.arange(B), torch.full((B,), keys.shape[2]), cfg)
    return None if out is None else out.reshape(B, 1, -1)


def decode_rows_kernel(qkv: torch.Tensor, cfg: ModelConfig, rope: Rope, keys: torch.Tensor, values: torch.Tensor,
                       layer: int, slots: list[int], positions: list[int]) -> torch.Tensor | None:
    """Attention of decode rows from their fused q|k|v, qkv [n, (nH + 2 nKV) D], to the heads' output
    [n, nH D] in one kernel call: row i one new token of cache slot slots[i] at positions[i] (rotate, cache
    write, attend; the same bits as `attention`'s ops). None where it does not apply (no build, a mask, sinks,
    partial or no rotary, q/k norm, value dims unlike key dims, not fp32): the caller runs the ops."""
    kernel = load_kernel()
    if (kernel is None or cfg.attention_sinks or layer in cfg.sliding_layers or layer in cfg.chunked_layers
            or cfg.qk_norm != "none" or cfg.rope_dim != cfg.head_dim or layer in cfg.nope_layers
            or qkv.dtype != torch.float32 or keys.dtype != torch.float32 or keys.shape != values.shape
            or not qkv.is_contiguous() or max(positions) >= rope.cos_h.shape[0]):
        return None
    return kernel.decode_rope_attention(qkv, cfg.num_heads, cfg.num_kv_heads, rope.cos_h[:, 0], rope.sin_signed_h[:, 0],
                                        keys, values, slots, positions, cfg.softmax_scale or cfg.head_dim ** -0.5)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
                     lengths: torch.Tensor, cfg: ModelConfig) -> torch.Tensor | None:
    """q [n, nH, D], one query per sequence, against keys/values [slots, nKV, len, D] rows `slots` over their
    first `lengths` positions, in one kernel call (quant/kernels/mwq_attention.h) -> [n, nH, Dv]; None where
    the kernel does not apply (no build, head dims % 16 != 0, not fp32): the caller takes SDPA."""
    kernel = load_kernel()
    if kernel is None or keys.dtype != torch.float32 or q.dtype != torch.float32:
        return None
    return kernel.decode_attention(q.contiguous(), keys, values, slots.to(torch.int64), lengths.to(torch.int64),
                                   cfg.softmax_scale or q.shape[-1] ** -0.5)


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
    SDPA reads the transposed views. The pieces (`qkv_heads`, `positioned`, `attend`) are the batched
    step's too."""
    B, T, _ = x.shape
    nH, nKV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    start = cache.length
    if start + T > cache.max_len:
        raise ValueError(f"sequence of {start + T} tokens exceeds the KV cache ({cache.max_len})")
    fused = w.get(prefix + "wqkv")
    if fused is not None and cfg.qk_norm == "none" and cfg.rope_dim == D and not cfg.nope_layers:
        qkv = linear(x, fused, w.get(prefix + "bqkv"))  # [B, T, (nH + 2 nKV) D]
        if B == 1 and T == 1 and (out := decode_rows_kernel(qkv.view(1, -1), cfg, rope, cache.k[layer],
                                                            cache.v[layer], layer, [0], [start])) is not None:
            return linear(out.view(1, 1, -1), w[prefix + "wo"], w.get(prefix + "bo"))
        qk = rope.rotate(qkv[..., : (nH + nKV) * D].view(B, T, nH + nKV, D), start)
        q, k = qk[:, :, :nH], qk[:, :, nH:]  # [B, T, nH, D], [B, T, nKV, D]
        v = qkv[..., (nH + nKV) * D :].view(B, T, nKV, D)
    else:
        q, k, v = qkv_heads(x, w, prefix, cfg)
        q, k = positioned(q, k, cfg, rope, start, layer, w, prefix)
    k_new, v_new = k.transpose(1, 2), v.transpose(1, 2)  # [B, nKV, T, D]
    if is_ring(cache.k[layer], cache.max_len):  # a sliding/chunked layer's span: read, attend, then write
        keys, values, key_pos = window_keys(cache.k[layer], cache.v[layer], slice(None), start, k_new, v_new)
        ring_write(cache.k[layer], cache.v[layer], slice(None), start, k_new, v_new)
        out = attend(q, keys, values, w, prefix, cfg, start, layer, key_pos)
        return linear(out, w[prefix + "wo"], w.get(prefix + "bo"))
    cache.k[layer][:, :, start : start + T] = k_new
    cache.v[layer][:, :, start : start + T] = v_new
    out = attend(q, cache.k[layer][:, :, : start + T], cache.v[layer][:, :, : start + T], w, prefix, cfg, start,
                 layer)
    return linear(out, w[prefix + "wo"], w.get(prefix + "bo"))
