"""Slow, plain-torch reference forward over canonical tensors (dense Llama layers and MoEfied layers).

Used by the default-model build for calibration, distillation and evaluation, and by tests as the
ground truth the engine's runtime must match. No KV cache: every call recomputes the whole sequence.

MoE layer semantics (router_scoring="linear", norm_topk_prob=False, absent_expert_bias=True):
    scores = x @ router.T                                  # [N, E], x = ffn_norm(h)
    chosen = top-k of scores (ties -> lower expert index)  # [N, k]
    out    = sum_{e in chosen} w2_e(silu(w1_e x) * w3_e x) + sum_{e not in chosen} absent_bias[e]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from d2moe.config import ModelConfig

Tensors = Mapping[str, torch.Tensor]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope_cos_sin(head_dim: int, theta: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF rotate_half convention: frequencies repeated over the two halves. Returns [T, D] each."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]  # [T, D/2]
    ang = torch.cat([ang, ang], dim=-1)  # [T, D]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, nH, T, D]; cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention(
    h: torch.Tensor, t: Tensors, layer: int, cfg: ModelConfig, cos, sin, cache: dict | None = None
) -> torch.Tensor:
    """Pre-norm causal GQA attention block output (without the residual). h [B, T, H] -> [B, T, H].

    With `cache` (a dict per layer, filled in place), h holds the tokens after the cached ones.
    """
    p = f"layers.{layer}."
    b, n, _ = h.shape
    d = cfg.head_dim
    start = 0 if cache is None or "k" not in cache else cache["k"].shape[2]
    x = rms_norm(h, t[p + "attn_norm"], cfg.rms_norm_eps)
    q = (x @ t[p + "wq"].T).view(b, n, cfg.num_heads, d).transpose(1, 2)  # [B, nH, T, D]
    k = (x @ t[p + "wk"].T).view(b, n, cfg.num_kv_heads, d).transpose(1, 2)  # [B, nKV, T, D]
    v = (x @ t[p + "wv"].T).view(b, n, cfg.num_kv_heads, d).transpose(1, 2)
    cs, sn = cos[start : start + n], sin[start : start + n]
    q, k = apply_rope(q, cs, sn), apply_rope(k, cs, sn)
    if start:
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    if cache is not None:
        cache["k"], cache["v"] = k, v
    if n == 1 or start == 0:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1, enable_gqa=True)  # [B, nH, T, D]
    else:  # several new tokens after a cached prefix: causal mask aligned to the end
        mask = torch.ones(n, start + n, dtype=torch.bool).tril(start)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return o.transpose(1, 2).reshape(b, n, cfg.num_heads * d) @ t[p + "wo"].T


def swiglu_hidden(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """x [N, H], w1/w3 [I, H] -> [N, I]."""
    return F.silu(x @ w1.T) * (x @ w3.T)


def dense_ffn(x: torch.Tensor, t: Tensors, layer: int) -> torch.Tensor:
    p = f"layers.{layer}.ffn."
    return swiglu_hidden(x, t[p + "w1"], t[p + "w3"]) @ t[p + "w2"].T


def route_topk(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices [N, k] of the k largest scores per row; ties go to the lower expert index (stable)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :top_k]


def routing_mask(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean [N, E]: True where the expert is among the token's top-k."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, route_topk(scores, top_k), True)


def moe_ffn(x: torch.Tensor, t: Tensors, layer: int, cfg: ModelConfig, top_k: int | None = None) -> torch.Tensor:
    """Linear-scored top-k MoE with absent-expert bias. x [N, H] (already ffn-normed) -> [N, H]."""
    p = f"layers.{layer}."
    k = top_k or cfg.top_k
    mask = routing_mask(x @ t[p + "router"].T, k)  # [N, E]
    out = (~mask).to(x.dtype) @ t[p + "absent_bias"] if cfg.absent_expert_bias else torch.zeros_like(x)
    for e in range(cfg.num_experts):
        rows = mask[:, e].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        q = f"{p}experts.{e}."
        y = swiglu_hidden(x[rows], t[q + "w1"], t[q + "w3"]) @ t[q + "w2"].T
        out.index_add_(0, rows, y)
    return out


def ffn(h: torch.Tensor, t: Tensors, layer: int, cfg: ModelConfig, top_k: int | None = None) -> torch.Tensor:
    """FFN block output (without the residual) for a dense or MoE layer. h [B, T, H]."""
    x = rms_norm(h, t[f"layers.{layer}.ffn_norm"], cfg.rms_norm_eps).reshape(-1, h.shape[-1])
    if layer in cfg.dense_layers:
        y = dense_ffn(x, t, layer)
    else:
        y = moe_ffn(x, t, layer, cfg, top_k)
    return y.view_as(h)


def hidden_states(t: Tensors, cfg: ModelConfig, ids: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """ids [B, T] -> final normed hidden [B, T, H]."""
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, ids.shape[1])
    h = t["embed"][ids]
    for layer in range(cfg.num_layers):
        h = h + attention(h, t, layer, cfg, cos, sin)
        h = h + ffn(h, t, layer, cfg, top_k)
    return rms_norm(h, t["norm"], cfg.rms_norm_eps)


def lm_head(t: Tensors) -> torch.Tensor:
    return t["embed"] if "lm_head" not in t else t["lm_head"]


def forward(t: Tensors, cfg: ModelConfig, ids: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """ids [B, T] -> logits [B, T, V]."""
    return hidden_states(t, cfg, ids, top_k) @ lm_head(t).T


def eval_windows(ids: torch.Tensor | list[int], n_tokens: int = 8192, window: int = 256) -> torch.Tensor:
    """The evaluation protocol: first `n_tokens` tokens cut into non-overlapping windows -> [n_tokens//window, window]."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() < n_tokens:
        raise ValueError(f"need {n_tokens} tokens, text has {ids.numel()}")
    return ids[: n_tokens // window * window].view(-1, window)


def nll_from_hidden(hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of every token after the first of each row. hidden [B, T, H], ids [B, T]."""
    logits = hidden[:, :-1] @ head.T  # [B, T-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")


@torch.no_grad()
def perplexity(t: Tensors, cfg: ModelConfig, windows: torch.Tensor, top_k: int | None = None, batch: int = 8) -> float:
    """exp(mean NLL) over windows [W, C], predicting every token after the first of its window."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        w = windows[i : i + batch]
        total += nll_from_hidden(hidden_states(t, cfg, w, top_k), lm_head(t), w).item()
        count += w.shape[0] * (w.shape[1] - 1)
    return math.exp(total / count)


@torch.no_grad()
def sample(
    t: Tensors,
    cfg: ModelConfig,
    prompt: list[int],
    n_new: int,
    num_samples: int = 1,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: tuple[int, ...] = (),
    top_k: int | None = None,
) -> list[list[int]]:
    """Nucleus sampling with a KV cache, `num_samples` continuations of one prompt (temperature 0: greedy).

    A sequence that emits a stop id keeps it as its last token and is cut there.
    """
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.rope_theta, len(prompt) + n_new)
    caches = [dict() for _ in range(cfg.num_layers)]
    ids = torch.tensor([prompt] * num_samples)  # [B, T]
    out = torch.empty(num_samples, 0, dtype=torch.long)
    for _ in range(n_new):
        h = t["embed"][ids]
        for layer in range(cfg.num_layers):
            h = h + attention(h, t, layer, cfg, cos, sin, caches[layer])
            h = h + ffn(h, t, layer, cfg, top_k)
        logits = rms_norm(h[:, -1], t["norm"], cfg.rms_norm_eps) @ lm_head(t).T  # [B, V]
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = (logits / temperature).softmax(-1)
            sorted_p, order = probs.sort(-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # smallest prefix reaching top_p
            sorted_p = sorted_p * keep
            pick = torch.multinomial(sorted_p, 1, generator=generator).squeeze(1)
            nxt = order.gather(1, pick[:, None]).squeeze(1)
        out = torch.cat([out, nxt[:, None]], dim=1)
        ids = nxt[:, None]
    seqs = []
    for row in out.tolist():
        cut = next((i + 1 for i, x in enumerate(row) if x in stop_ids), len(row))
        seqs.append(row[:cut])
    return seqs


@torch.no_grad()
def greedy(t: Tensors, cfg: ModelConfig, ids: list[int], n_new: int, top_k: int | None = None) -> list[int]:
    """Greedy continuation (recomputes the prefix each step: a reference, not a runtime)."""
    seq = list(ids)
    for _ in range(n_new):
        h = hidden_states(t, cfg, torch.tensor([seq]), top_k)[0, -1]
        seq.append(int((h @ lm_head(t).T).argmax()))
    return seq[len(ids) :]
