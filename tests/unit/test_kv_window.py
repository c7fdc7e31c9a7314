"""Ring KV caches for sliding and chunked layers (models/kv_window.py) against the full position-indexed
layout they replace: the same attention output for any split of a sequence into steps."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.config import ModelConfig
from d2moe.engine.memory import kv_cache_bytes
from d2moe.models.kv_window import cache_len, is_ring, layer_span, ring_write, window_keys
from d2moe.models.layers import KVCache, attend

CFG = ModelConfig(family="gpt_oss", vocab_size=16, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1,
                  head_dim=8, expert_intermediate=16, num_experts=2, top_k=1, sliding_window=4,
                  sliding_layers=(0,), attention_chunk=5, chunked_layers=(1,))


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.integers(1, 9), min_size=1, max_size=6), layer=st.sampled_from([0, 1]),
       seed=st.integers(0, 2**16))
def test_ring_attends_as_the_full_cache(steps, layer, seed):
    g = torch.Generator().manual_seed(seed)
    total = sum(steps)
    q = torch.randn(1, total, 2, 8, generator=g)
    k, v = torch.randn(1, 1, total, 8, generator=g), torch.randn(1, 1, total, 8, generator=g)
    span = layer_span(CFG, layer)
    ring_k, ring_v = torch.zeros(1, 1, span, 8), torch.zeros(1, 1, span, 8)
    start = 0
    for T in steps:
        new = slice(start, start + T)
        full = attend(q[:, new], k[:, :, : start + T], v[:, :, : start + T], {}, "", CFG, start, layer)
        keys, values, pos = window_keys(ring_k, ring_v, slice(None), start, k[:, :, new], v[:, :, new])
        ring_write(ring_k, ring_v, slice(None), start, k[:, :, new], v[:, :, new])
        ring = attend(q[:, new], keys, values, {}, "", CFG, start, layer, pos)
        torch.testing.assert_close(ring, full, atol=1e-6, rtol=1e-5)
        assert keys.shape[2] <= span - 1 + T
        start += T
    last = torch.arange(max(0, total - span), total)
    assert torch.equal(ring_k[0, 0, last % span], k[0, 0, last])  # the ring holds the last span positions


def test_only_windowed_layers_are_rings_and_the_budget_counts_their_span():
    cache = KVCache(CFG, 1, 64)
    assert [t.shape[2] for t in cache.k] == [4, 5, 64]
    assert [is_ring(t, 64) for t in cache.k] == [True, True, False]
    assert [cache_len(CFG, L, 3) for L in range(3)] == [3, 3, 3]  # a short context is no ring
    full = dataclasses.replace(CFG, sliding_layers=(), chunked_layers=())
    per_position = kv_cache_bytes(full, 1)
    assert kv_cache_bytes(full, 64) == 64 * per_position
    assert kv_cache_bytes(CFG, 64) == (4 + 5 + 64) * per_position // 3 == cache.nbytes()
