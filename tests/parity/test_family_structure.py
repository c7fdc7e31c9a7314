"""Each added family at realistic proportions (tiny hidden size, the real model's structure): expert counts
and top-k, shared against routed experts, leading dense layers, head-dim ratios, RoPE scaling, and the
config.json keys the hub checkpoints carry (transformers 4 style), so shape and config bugs show."""

from __future__ import annotations

import json

import pytest
import torch

from d2moe.convert.convert import open_source, reference_decoder
from d2moe.convert.families import ConversionError
from tiny_hf import randomize

ATOL = 1e-4  # fp32 against fp32, different op order (measured ~5e-6)


def _hub_style(path, **extra) -> None:
    """Rewrite a transformers 5 config.json the way hub checkpoints store it (rope_theta + rope_scaling)."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type") != "default":
        rope["type"] = rope.pop("rope_type")
        cfg["rope_scaling"] = rope
    cfg.update(extra)
    (path / "config.json").write_text(json.dumps(cfg))


def _saved(model, path):
    """Randomize a tiny transformers model, save it as a hub checkpoint (`_hub_style`), and return the
    ModelConfig d2moe reads from it."""
    randomize(model)
    model.save_pretrained(path)
    _hub_style(path)
    return open_source(path).model


def _compare(path, T: int = 40) -> float:
    import transformers

    ids = torch.randint(3, 256, (1, T), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(ids).logits
    dec = reference_decoder(path)
    ours = dec.forward(ids, dec.new_cache(1, T), bits=8)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)
    return (ours - ref).abs().max().item()


def _yarn(factor: float, original: int, mscale: float) -> dict:
    return dict(rope_type="yarn", rope_theta=10000.0, factor=factor, original_max_position_embeddings=original,
                mscale=mscale, mscale_all_dim=mscale, beta_fast=32, beta_slow=1)


def test_deepseek_v3_structure(tmp_path):
    """DeepSeek-V3 scaled from hidden 7168: 256 routed -> 64 experts in 8 groups (4 kept), top-8, 1 shared,
    first 3 of the layers dense, q LoRA, kv latent 4x the rotary dims, nope = v = 2x rope, YaRN x40."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(
        vocab_size=256, hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=5,
        num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=8,
        n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=3,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=2560, rope_parameters=_yarn(40.0, 64, 1.0), bos_token_id=0, eos_token_id=1,
    )
    model = tf.DeepseekV3ForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    _hub_style(tmp_path, scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    m = open_source(tmp_path).model
    assert (m.attention, m.q_lora_rank, m.head_dim, m.value_dim, m.dense_layers) == ("mla", 96, 48, 32, (0, 1, 2))
    assert (m.num_experts, m.top_k, m.expert_groups, m.topk_groups, m.shared_expert_intermediate) == (64, 8, 8, 4, 64)
    assert m.rope_scaling is not None and m.rope_scaling.factor == 40.0
    _compare(tmp_path)


def test_deepseek_v2_lite_structure(tmp_path):
    """DeepSeek-V2-Lite scaled from hidden 2048: 64 routed experts, top-6, 2 shared, first layer dense,
    no q LoRA, greedy softmax routing, YaRN x40 with mscale 0.707."""
    import transformers as tf

    torch.manual_seed(1)
    cfg = tf.DeepseekV2Config(
        vocab_size=256, hidden_size=128, intermediate_size=640, moe_intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=8, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        topk_method="greedy", first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=2560, rope_parameters=_yarn(40.0, 64, 0.707),
    )
    model = tf.DeepseekV2ForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    _hub_style(tmp_path, scoring_func="softmax", moe_layer_freq=1)
    m = open_source(tmp_path).model
    assert (m.q_lora_rank, m.top_k, m.expert_groups, m.dense_layers) == (0, 6, 1, (0,))
    assert m.shared_expert_intermediate == 128
    _compare(tmp_path)


def test_deepseek_unknown_routing_is_one_clear_error(tmp_path, tiny_checkpoints):
    import shutil

    ck = shutil.copytree(tiny_checkpoints["deepseek_v2"], tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["topk_method"] = "noaux_tc"
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="deepseek_v2 with topk_method='noaux_tc'"):
        open_source(ck)


@pytest.mark.parametrize("shared", [0, 256])
def test_granite_structure(tmp_path, shared):
    """granite-3.0-3b-a800m scaled from hidden 1536: 40 experts, top-8, GQA 3:1, its four multipliers;
    with `shared`, a GraniteMoeShared shared expert (fused input_linear split at conversion)."""
    import transformers as tf

    torch.manual_seed(2)
    kw = dict(vocab_size=256, hidden_size=192, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, num_local_experts=40, num_experts_per_tok=8, embedding_multiplier=12.0,
              residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=6.0, max_position_embeddings=256,
              rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    if shared:
        model = tf.GraniteMoeSharedForCausalLM(tf.GraniteMoeSharedConfig(**kw, shared_intermediate_size=shared))
    else:
        model = tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(**kw))
    model.eval()
    m = _saved(model, tmp_path)
    assert (m.num_experts, m.top_k, m.shared_expert_intermediate, m.softmax_scale) == (40, 8, shared, 0.015625)
    _compare(tmp_path)



def test_granitemoe_swa_structure(tmp_path):
    """GraniteMoeSWA at granite-3.0-3b-a800m's proportions (hidden 1536 -> 192): 40 experts, top-8, GQA 3:1,
    a shared expert, its four multipliers, sinks, the default layer types (every 4th layer full, the rest
    sliding with a window shorter than the prompt) and the full layers without RoPE (layer_rope_theta 0)."""
    import transformers as tf

    torch.manual_seed(15)
    cfg = tf.GraniteMoeSWAConfig(
        vocab_size=256, hidden_size=192, intermediate_size=64, num_hidden_layers=5, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=40, num_experts_per_tok=8, shared_intermediate_size=256,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=6.0,
        sliding_window=16, layer_rope_theta=[0, 10000.0, 10000.0, 10000.0, 0], max_position_embeddings=256,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )
    model = tf.GraniteMoeSWAForCausalLM(cfg).eval()
    m = _saved(model, tmp_path)
    assert (m.num_experts, m.top_k, m.shared_expert_intermediate, m.attention_sinks) == (40, 8, 256, True)
    assert (m.sliding_layers, m.nope_layers, m.sliding_window) == ((1, 2, 3), (0, 4), 16)
    _compare(tmp_path)

def test_phimoe_structure(tmp_path):
    """Phi-3.5-MoE scaled from hidden 4096: 16 experts, top-2 by sparsemixer, GQA 4:1, LayerNorms, q/k/v/o and
    head biases, LongRoPE with per-frequency short factors and mscale, sliding window = context."""
    import transformers as tf

    torch.manual_seed(3)
    short = (1.0 + 2.0 * torch.rand(16)).tolist()  # head dim 32: 16 frequencies
    rope = dict(rope_type="longrope", rope_theta=10000.0, short_factor=short, long_factor=[4.0] * 16,
                short_mscale=1.243, long_mscale=1.243, original_max_position_embeddings=64)
    cfg = tf.PhimoeConfig(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, num_local_experts=16, num_experts_per_tok=2,
                          attention_bias=True, lm_head_bias=True, max_position_embeddings=2048, sliding_window=2048,
                          rope_parameters=rope)
    model = tf.PhimoeForCausalLM(cfg).eval()
    m = _saved(model, tmp_path)
    assert m.rope_scaling is not None and m.rope_scaling.kind == "longrope" and m.norm == "layer"
    _compare(tmp_path)


def test_hybrid_architecture_is_one_clear_error(tmp_path, tiny_checkpoints):
    import shutil

    ck = shutil.copytree(tiny_checkpoints["mixtral"], tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["architectures"] = ["GraniteMoeHybridForCausalLM"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"^unsupported .*Mamba.*; d2moe converts: .*DeepseekV3ForCausalLM") as e:
        open_source(ck)
    assert "\n" not in str(e.value)


def test_glm4_moe_structure(tmp_path):
    """GLM-4.5-Air scaled from hidden 4096: 128 routed -> 64 experts, top-8, 1 shared, first layer dense,
    GQA 12:1 with q/k/v biases, RoPE on half of each head (hub config: top-level partial_rotary_factor)."""
    import transformers as tf

    torch.manual_seed(4)
    cfg = tf.Glm4MoeConfig(
        vocab_size=256, hidden_size=128, head_dim=16, num_attention_heads=12, num_key_value_heads=1,
        intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=3, n_routed_experts=64,
        num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.0, attention_bias=True, use_qk_norm=False,
        max_position_embeddings=256,
    )
    model = tf.Glm4MoeForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    _hub_style(tmp_path, partial_rotary_factor=0.5)
    hub = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" not in hub
    m = open_source(tmp_path).model
    assert (m.rope_dim, m.num_experts, m.top_k, m.dense_layers, m.shared_expert_intermediate) == (8, 64, 8, (0,), 64)
    _compare(tmp_path)


def test_ernie4_5_moe_structure(tmp_path):
    """ERNIE-4.5-21B-A3B scaled from hidden 2560: 64 experts, top-6, 2 shared, first layer dense, GQA 5:1,
    tied embeddings, interleaved-pair RoPE, hub config keys (moe_num_experts, moe_k, rope_theta)."""
    import transformers as tf

    torch.manual_seed(5)
    cfg = tf.Ernie4_5_MoeConfig(
        vocab_size=256, hidden_size=128, num_attention_heads=10, num_key_value_heads=2, head_dim=16,
        intermediate_size=576, moe_intermediate_size=64, num_hidden_layers=3, moe_num_experts=64, moe_k=6,
        moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=2, tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    model = tf.Ernie4_5_MoeForCausalLM(cfg).eval()
    m = _saved(model, tmp_path)
    assert (m.num_experts, m.top_k, m.dense_layers, m.shared_expert_intermediate, m.tie_word_embeddings) == (
        64, 6, (0,), 128, True)
    _compare(tmp_path)



def test_dots1_structure(tmp_path):
    """dots.llm1 scaled from hidden 4096: 128 routed -> 64 experts, top-6, 2 shared, first layer dense,
    multi-head attention with per-head q/k norm, sigmoid router with choice bias and routed scaling 2.5,
    max_window_layers = all layers (no layer slides), hub config keys (rope_theta)."""
    import transformers as tf

    torch.manual_seed(8)
    cfg = tf.Dots1Config(
        vocab_size=256, hidden_size=128, num_attention_heads=8, num_key_value_heads=8, head_dim=16,
        intermediate_size=352, moe_intermediate_size=48, num_hidden_layers=3, n_routed_experts=64,
        num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, max_window_layers=62, max_position_embeddings=256,
        rope_parameters=dict(rope_type="default", rope_theta=10000000.0),
    )
    model = tf.Dots1ForCausalLM(cfg).eval()
    m = _saved(model, tmp_path)
    assert (m.num_experts, m.top_k, m.dense_layers, m.shared_expert_intermediate, m.qk_norm, m.sliding_layers) == (
        64, 6, (0,), 96, "head", ())
    _compare(tmp_path)


def test_hunyuan_moe_structure(tmp_path):
    """Hunyuan-A13B scaled from hidden 4096: 64 experts, top-8 (given per layer, as the hub config does), a
    shared MLP as wide as each expert, GQA 4:1, q/k norms after RoPE, NTK-alpha RoPE (alpha 1000) written as
    the hub's rope_scaling type "dynamic"."""
    import transformers as tf

    torch.manual_seed(9)
    cfg = tf.HunYuanMoEV1Config(
        vocab_size=256, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, num_hidden_layers=3, num_experts=64, moe_topk=[8, 8, 8], max_position_embeddings=256,
        rope_parameters=dict(rope_type="dynamic", alpha=1000.0, factor=1.0, rope_theta=10000.0),
    )
    model = tf.HunYuanMoEV1ForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    _hub_style(tmp_path, use_cla=False, use_qk_norm=True, num_shared_expert=[1, 1, 1])
    m = open_source(tmp_path).model
    assert (m.num_experts, m.top_k, m.shared_expert_intermediate, m.qk_norm, m.rope_scaling) == (
        64, 8, 96, "head_rope", None)
    assert m.rope_theta == pytest.approx(10000.0 * 1000.0 ** (16 / 14))
    _compare(tmp_path)


def test_minimax_m2_structure(tmp_path):
    """MiniMax-M2 scaled from hidden 3072: 256 -> 64 experts, top-8, GQA 6:1 with heads x head_dim > hidden,
    q/k norms over all heads, RoPE on 64 of 128 dims (the hub config's rotary_dim, no partial_rotary_factor),
    sigmoid router with choice bias, its hub keys (attn_type_list, scoring_func, use_routing_bias)."""
    import transformers as tf

    torch.manual_seed(10)
    cfg = tf.MiniMaxM2Config(
        vocab_size=256, hidden_size=128, num_attention_heads=12, num_key_value_heads=2, head_dim=16, rotary_dim=8,
        intermediate_size=64, num_hidden_layers=3, num_local_experts=64, num_experts_per_tok=8,
        max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
    )
    model = tf.MiniMaxM2ForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    _hub_style(tmp_path, attn_type_list=[1, 1, 1], use_qk_norm=True, qk_norm_type="per_layer",
               scoring_func="sigmoid", use_routing_bias=True)
    assert "partial_rotary_factor" not in json.loads((tmp_path / "config.json").read_text())
    m = open_source(tmp_path).model
    assert (m.num_experts, m.top_k, m.rope_dim, m.qk_norm, m.router_scoring, m.router_bias) == (
        64, 8, 8, "full", "sigmoid", True)
    _compare(tmp_path)


def test_glm4_moe_lite_structure(tmp_path):
    """GLM-4.7-Flash scaled from hidden 2048: MLA with q LoRA (its rank ratios: q 12x, kv latent 8x the rotary
    dims; nope 3x, value 4x), 64 experts, top-4, 1 shared, first layer dense by default (the hub config has no
    mlp_layer_types), routed scaling 1.8, rms_norm_eps 1e-5 beside the latent norms' 1e-6."""
    import transformers as tf

    torch.manual_seed(11)
    cfg = tf.Glm4MoeLiteConfig(
        vocab_size=256, hidden_size=128, num_attention_heads=4, num_key_value_heads=4, intermediate_size=640,
        moe_intermediate_size=96, num_hidden_layers=3, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=4,
        routed_scaling_factor=1.8, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=24, qk_rope_head_dim=8,
        v_head_dim=32, max_position_embeddings=256, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    )
    model = tf.Glm4MoeLiteForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    _hub_style(tmp_path)
    hub = json.loads((tmp_path / "config.json").read_text())
    del hub["mlp_layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(hub))
    m = open_source(tmp_path).model
    assert (m.attention, m.q_lora_rank, m.head_dim, m.value_dim, m.dense_layers, m.latent_eps) == (
        "mla", 96, 32, 32, (0,), 1e-6)
    assert (m.num_experts, m.top_k, m.shared_expert_intermediate, m.rms_norm_eps) == (64, 4, 96, 1e-5)
    _compare(tmp_path)


def test_flex_olmo_structure(tmp_path):
    """FlexOlmo-7x7B scaled from hidden 4096: 7 experts, top-5 (unnormalised softmax weights), multi-head
    attention with q/k norms over all heads, post-norm blocks (no input norms), RoPE theta 5e5."""
    import transformers as tf

    torch.manual_seed(12)
    cfg = tf.FlexOlmoConfig(
        vocab_size=256, hidden_size=128, num_attention_heads=8, num_key_value_heads=8, intermediate_size=344,
        num_hidden_layers=3, num_experts=7, num_experts_per_tok=5, max_position_embeddings=256, pad_token_id=0,
        eos_token_id=1, rope_parameters=dict(rope_type="default", rope_theta=500000.0),
    )
    model = tf.FlexOlmoForCausalLM(cfg).eval()
    m = _saved(model, tmp_path)
    assert (m.num_experts, m.top_k, m.norm_topk_prob, m.qk_norm, m.post_norm) == (7, 5, False, "full", True)
    _compare(tmp_path)


def test_exaone_moe_structure(tmp_path):
    """K-EXAONE-like proportions at hidden 128: 64 experts, top-8, 1 shared, first layer dense, GQA 8:1, three
    local (sliding, RoPE) layers then a global (NoPE) one, window shorter than the prompt, routed scaling 2.5;
    the hub config gives sliding_window_pattern without layer_types."""
    import transformers as tf

    torch.manual_seed(13)
    cfg = tf.ExaoneMoeConfig(
        vocab_size=256, hidden_size=128, num_attention_heads=16, num_key_value_heads=2, head_dim=16,
        intermediate_size=384, moe_intermediate_size=32, num_hidden_layers=5, num_experts=64, num_experts_per_tok=8,
        num_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, sliding_window=8,
        sliding_window_pattern=4, max_position_embeddings=256,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    )
    model = tf.ExaoneMoeForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    _hub_style(tmp_path)
    hub = json.loads((tmp_path / "config.json").read_text())
    del hub["layer_types"], hub["mlp_layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(hub))
    m = open_source(tmp_path).model
    assert (m.num_experts, m.top_k, m.dense_layers, m.shared_expert_intermediate) == (64, 8, (0,), 32)
    assert (m.sliding_layers, m.nope_layers, m.sliding_window, m.qk_norm) == ((0, 1, 2, 4), (3,), 8, "head")
    _compare(tmp_path)


def test_solar_open_structure(tmp_path):
    """Solar Open 100B scaled from hidden 4096: 128 routed -> 64 experts, top-8, 1 shared, every layer MoE,
    GQA 8:1 with heads x head_dim = 2 x hidden, RoPE theta 1e6 on whole heads."""
    import transformers as tf

    torch.manual_seed(14)
    cfg = tf.SolarOpenConfig(
        vocab_size=256, hidden_size=128, num_attention_heads=16, num_key_value_heads=2, head_dim=16,
        moe_intermediate_size=40, num_hidden_layers=3, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=8,
        max_position_embeddings=256, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    )
    model = tf.SolarOpenForCausalLM(cfg).eval()
    m = _saved(model, tmp_path)
    assert (m.num_experts, m.top_k, m.dense_layers, m.shared_expert_intermediate, m.rope_dim) == (64, 8, (), 40, 16)
    _compare(tmp_path)

def _to_mxfp4_checkpoint(path) -> None:
    """Rewrite a transformers-saved GPT-OSS as the released checkpoints are: experts as MXFP4 blocks of W
    ([E, out, in/32, 16] + E8M0 scales), a quantization_config transformers reads them with."""
    from safetensors.torch import load_file, save_file

    from d2moe.convert.dequant import quantize_mxfp4

    out = {}
    for k, v in load_file(str(path / "model.safetensors")).items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            w = v.transpose(1, 2).contiguous()  # transformers keeps x @ W; the checkpoint W [E, out, in]
            blocks, scales = quantize_mxfp4(w)
            out[k + "_blocks"] = blocks.reshape(*w.shape[:2], -1, 16)
            out[k + "_scales"] = scales
        else:
            out[k] = v
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(cfg))


def test_gpt_oss_structure_mxfp4(tmp_path):
    """gpt-oss-20b scaled from hidden 2880: 32 experts, top-4, GQA 4:1 with heads x head_dim > hidden,
    sliding and full attention alternating (window shorter than the prompt), sinks, YaRN x32, and experts
    in MXFP4 as released, compared with transformers' own MXFP4 loader (dequantizing on CPU)."""
    import transformers as tf

    torch.manual_seed(6)
    cfg = tf.GptOssConfig(
        vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=32, intermediate_size=128, num_local_experts=32, num_experts_per_tok=4, sliding_window=8,
        max_position_embeddings=2048, swiglu_limit=1.0, rope_parameters=dict(
            rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
            original_max_position_embeddings=64, truncate=False),
    )
    model = tf.GptOssForCausalLM(cfg).eval()
    randomize(model)
    model.save_pretrained(tmp_path)
    _to_mxfp4_checkpoint(tmp_path)
    m = open_source(tmp_path).model
    assert (m.num_experts, m.top_k, m.sliding_layers, m.sliding_window, m.expert_act) == (
        32, 4, (0, 2), 8, "clamped_swiglu")
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                 quantization_config=tf.Mxfp4Config(dequantize=True)).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    dec = reference_decoder(tmp_path)
    torch.testing.assert_close(dec.forward(ids, dec.new_cache(1, 40), bits=8), ref, atol=ATOL, rtol=1e-4)


def test_llama4_scout_structure_multimodal_layout(tmp_path):
    """Llama-4-Scout scaled from hidden 5120: 16 experts, top-1, every layer MoE with a shared expert, GQA
    5:1, NoPE every 4th layer, chunked attention elsewhere (chunk < prompt), llama3 RoPE x16, stored as the
    hub's multimodal checkpoint (text_config, language_model. prefix)."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    torch.manual_seed(7)
    cfg = tf.Llama4TextConfig(
        vocab_size=256, hidden_size=128, num_hidden_layers=4, num_attention_heads=10, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, intermediate_size_mlp=128, num_local_experts=16, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=16, floor_scale=8, attn_scale=0.1, use_qk_norm=True,
        max_position_embeddings=1024, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0,
                                                           low_freq_factor=1.0, high_freq_factor=1.0,
                                                           original_max_position_embeddings=64),
    )
    model = tf.Llama4ForCausalLM(cfg).eval()
    randomize(model)
    text = tmp_path / "text"
    model.save_pretrained(text)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    hub = tmp_path / "hub"
    hub.mkdir()
    tensors = load_file(str(text / "model.safetensors"))
    save_file({"language_model." + k: v for k, v in tensors.items()}, str(hub / "model.safetensors"))
    text_cfg = json.loads((text / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps({"architectures": ["Llama4ForConditionalGeneration"],
                                                 "text_config": text_cfg, "vision_config": {}}))
    m = open_source(hub).model
    assert (m.num_experts, m.top_k, m.dense_layers, m.nope_layers, m.chunked_layers) == (16, 1, (), (3,), (0, 1, 2))
    assert m.rope_scaling is not None and m.rope_scaling.kind == "llama3"
    dec = reference_decoder(hub)
    torch.testing.assert_close(dec.forward(ids, dec.new_cache(1, 40), bits=8), ref, atol=ATOL, rtol=1e-4)


def test_deepseek_v3_block_fp8_checkpoint(tmp_path, tiny_checkpoints):
    """DeepSeek-V3 as released: projections in float8 e4m3 with a weight_scale_inv per block (here 32 x 32,
    so blocks tile the tiny matrices with partial edges). Conversion dequantizes them: the logits equal
    transformers' on the dequantized weights."""
    import shutil

    import transformers as tf
    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["deepseek_v3"]
    tensors = load_file(str(src / "model.safetensors"))
    fp8, dequantized = {}, {}
    for k, v in tensors.items():
        if v.dim() == 2 and "proj" in k:  # as released: projections in FP8; embeddings, norms, routers not
            R, C = v.shape
            blocks = torch.nn.functional.pad(v, (0, -C % 32, 0, -R % 32)).view(-(-R // 32), 32, -(-C // 32), 32)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # [R/32, C/32]
            full = scale.repeat_interleave(32, 0)[:R].repeat_interleave(32, 1)[:, :C]
            q = (v / full).to(torch.float8_e4m3fn)
            fp8[k], fp8[k + "_scale_inv"] = q, scale
            dequantized[k] = q.float() * full
        else:
            fp8[k] = dequantized[k] = v
    ref_dir = shutil.copytree(src, tmp_path / "ref")
    save_file(dequantized, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    ck = shutil.copytree(src, tmp_path / "fp8")
    save_file(fp8, str(ck / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [32, 32]}
    (ck / "config.json").write_text(json.dumps(cfg))
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tf.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()(ids).logits
    dec = reference_decoder(ck)
    torch.testing.assert_close(dec.forward(ids, dec.new_cache(1, 24), bits=8), ref, atol=ATOL, rtol=1e-4)
