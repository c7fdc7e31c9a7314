"""Building blocks the added families use, checked by hand: group-limited routing, sparsemixer, YaRN tables,
config round trips (old stores' config.json still loads)."""

from __future__ import annotations

import math

import torch

from d2moe.config import ModelConfig, RopeScaling
from d2moe.models.layers import Rope, yarn_inv_freq
from d2moe.models.moe import route, sparsemixer

_BASE = dict(family="t", vocab_size=8, hidden_size=4, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=4)


def test_group_limited_choice_skips_a_group_with_one_strong_expert():
    """V3: groups ranked by their best two scores; a group with one high score loses to a group with two
    good ones, so the single best expert is not chosen."""
    cfg = ModelConfig(**_BASE, num_experts=6, top_k=2, expert_groups=3, topk_groups=1, group_score="top2",
                      router_scoring="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.0, router_bias=True)
    logits = torch.tensor([[3.0, -3.0, 1.0, 1.0, -2.0, -2.0]])  # groups {0,1}: 0.95+0.05, {2,3}: 0.73+0.73
    r = route(logits, torch.eye(6), cfg, bias=torch.zeros(6))
    assert sorted(r.idx[0].tolist()) == [2, 3]
    torch.testing.assert_close(r.weight, torch.tensor([[1.0, 1.0]]))  # normalised to 1 each half, times 2
    # V2's group score is the best expert's: the first group wins
    cfg2 = ModelConfig(**{**_BASE}, num_experts=6, top_k=2, expert_groups=3, topk_groups=1, group_score="max")
    assert sorted(route(logits, torch.eye(6), cfg2).idx[0].tolist()) == [0, 1]


def test_choice_bias_moves_the_choice_not_the_weight():
    cfg = ModelConfig(**_BASE, num_experts=4, top_k=1, router_scoring="sigmoid", norm_topk_prob=False,
                      router_bias=True)
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    r = route(logits, torch.eye(4), cfg, bias=torch.tensor([0.0, 0.5, 0.0, 0.0]))
    assert r.idx.tolist() == [[1]]
    torch.testing.assert_close(r.weight, torch.tensor([[1 / (1 + math.exp(-1.0))]]))


def test_sparsemixer_by_hand():
    """Pick one: best expert 0 (score 1.0); within 2*eps = 0.2 relative: expert 1 (0.9), not 2 (0.5).
    Pick two: best of the rest is 1; near it: 1 and not 2 ((0.9 - 0.5) / 0.9 > 0.2), so weight 1."""
    r = sparsemixer(torch.tensor([[1.0, 0.9, 0.5, -1.0]]), eps=0.1)
    assert r.idx.tolist() == [[0, 1]]
    w0 = math.exp(1.0) / (math.exp(1.0) + math.exp(0.9))
    torch.testing.assert_close(r.weight, torch.tensor([[w0, 1.0]]))


def test_yarn_keeps_fast_dims_and_interpolates_slow_ones():
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    s = RopeScaling(factor=8.0, original_max_position=4096)  # ramp over pairs floor(10.5) .. ceil(22.5)
    out = yarn_inv_freq(inv, 10000.0, s)
    assert torch.equal(out[:11], inv[:11])  # 32+ rotations over the original context: extrapolated
    torch.testing.assert_close(out[23:], inv[23:] / 8)  # under one: interpolated
    assert ((out <= inv) & (out >= inv / 8 - 1e-12)).all()
    rope = Rope(64, 10000.0, 16, RopeScaling(factor=8.0, original_max_position=256, attention_factor=1.5))
    torch.testing.assert_close(rope.cos[0], torch.full((64,), 1.5))


def test_old_config_loads_and_new_config_round_trips():
    old = {**_BASE, "num_experts": 4, "top_k": 2, "expert_intermediate": 8, "dense_layers": [], "eos_token_ids": []}
    cfg = ModelConfig.from_dict(old)
    assert cfg.attention == "gqa" and cfg.rope_scaling is None and cfg.attn_scale == 0.5
    new = ModelConfig(**{**_BASE, "head_dim": 24}, num_experts=4, top_k=2, attention="mla", kv_lora_rank=16,
                      qk_rope_head_dim=8, v_head_dim=16, rope_scaling=RopeScaling(4.0, 64, kind="longrope",
                                                                                 dim_factors=(1.0, 2.0)))
    assert ModelConfig.from_dict(new.to_dict()) == new


def test_mxfp4_by_hand_and_round_trip():
    from d2moe.convert.dequant import dequantize_mxfp4, quantize_mxfp4

    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21  # low nibble 1 (+0.5) first, high nibble 2 (+1.0)
    blocks[0, 0, 1] = 0xF9  # 9 (-0.5), 15 (-6.0)
    w = dequantize_mxfp4(blocks, torch.full((1, 1), 128, dtype=torch.uint8))  # scale 2^1
    assert w.shape == (1, 32) and w[0, :4].tolist() == [1.0, 2.0, -1.0, -12.0] and not w[0, 4:].any()
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]).repeat(8).reshape(2, 32) * 0.25
    b, s = quantize_mxfp4(values)
    assert torch.equal(dequantize_mxfp4(b.reshape(2, 1, 16), s), values)


def test_exaone_layer_types_from_a_pattern():
    """K-EXAONE: an L/G string repeats from layer 0 and the last layer is global whatever it says; an int N
    makes every Nth layer global; without a window every layer is global (and keeps RoPE)."""
    from d2moe.convert.family_configs import exaone_layer_types

    L, G = "sliding_attention", "full_attention"
    assert exaone_layer_types({"num_hidden_layers": 6, "sliding_window": 128, "sliding_window_pattern": "LLLG"}) == [
        L, L, L, G, L, G]
    assert exaone_layer_types({"num_hidden_layers": 4, "sliding_window": 128, "sliding_window_pattern": 2}) == [
        L, G, L, G]
    assert exaone_layer_types({"num_hidden_layers": 2, "sliding_window": None, "sliding_window_pattern": 4}) == [G, G]


def test_hunyuan_per_layer_values_must_agree():
    import pytest

    from d2moe.convert.family_configs import ConversionError, per_layer_value

    assert per_layer_value({"moe_topk": [8, 8]}, "moe_topk") == 8
    with pytest.raises(ConversionError, match="moe_topk differs between layers"):
        per_layer_value({"moe_topk": [8, 4]}, "moe_topk")
