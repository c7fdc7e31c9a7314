"""Bounded KV caches for layers that only look back a fixed span: a sliding window of W positions
(GPT-OSS, EXAONE, dots1, Granite SWA) or a chunk of C (Llama 4). Such a layer never reads a key more than
span - 1 positions behind its query, so it keeps span positions in a ring (position p at p % span) instead
of the whole context: GPT-OSS-20B's 12 sliding layers hold 128 positions each instead of 8192.

A step of T new tokens at positions start.. reads the ring's previous positions (at most span - 1, in
order) followed by its own new keys, attends with a mask built from those absolute positions, and only then
writes its last min(T, span) keys: a prefill chunk longer than the span would otherwise overwrite keys its
own earlier queries still need. Full-attention layers (and any cache no longer than the span) keep the
plain position-indexed layout; `is_ring` tells them apart.
"""

from __future__ import annotations

import torch

from d2moe.config import ModelConfig


def layer_span(cfg: ModelConfig, layer: int) -> int:
    """Positions a query of `layer` can see, its own included (0: unbounded)."""
    if cfg.attention == "mla":
        return 0
    if layer in cfg.sliding_layers and cfg.sliding_window:
        return cfg.sliding_window
    if layer in cfg.chunked_layers and cfg.attention_chunk:
        return cfg.attention_chunk
    return 0


def has_windows(cfg: ModelConfig) -> bool:
    """Whether any layer looks back only a bounded span (its cache is a ring for long contexts)."""
    return any(layer_span(cfg, layer) for layer in range(cfg.num_layers))


def cache_len(cfg: ModelConfig, layer: int, max_len: int) -> int:
    """Positions `layer` keeps for a context of `max_len`."""
    span = layer_span(cfg, layer)
    return min(span, max_len) if span else max_len


def is_ring(buf: torch.Tensor, max_len: int) -> bool:
    """Whether a layer's buffer [.., heads, len, D] is a ring (shorter than the context it serves)."""
    return buf.shape[2] < max_len


def window_keys(k_buf: torch.Tensor, v_buf: torch.Tensor, rows: slice, start: int, k_new: torch.Tensor,
                v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keys and values a step at positions start.. sees: the ring's previous positions (at most span - 1)
    then the step's own. k_buf/v_buf [B, nKV, span, D] (rows: the sequences of the step), k_new/v_new
    [b, nKV, T, D] -> keys, values [b, nKV, m + T, D] and their positions [m + T]."""
    span, T = k_buf.shape[2], k_new.shape[2]
    first = max(0, start - (span - 1))
    old = torch.arange(first, start)
    idx = old % span
    keys = torch.cat((k_buf[rows][:, :, idx], k_new), dim=2)
    values = torch.cat((v_buf[rows][:, :, idx], v_new), dim=2)
    return keys, values, torch.cat((old, torch.arange(start, start + T)))


def ring_write(k_buf: torch.Tensor, v_buf: torch.Tensor, rows: slice, start: int, k_new: torch.Tensor,
               v_new: torch.Tensor) -> None:
    """Store a step's keys/values [b, nKV, T, D] at positions start.. (the last `span` of them)."""
    span, T = k_buf.shape[2], k_new.shape[2]
    keep = min(T, span)
    idx = torch.arange(start + T - keep, start + T) % span
    k_buf[rows, :, idx] = k_new[:, :, T - keep:]
    v_buf[rows, :, idx] = v_new[:, :, T - keep:]
