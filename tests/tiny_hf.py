"""Tiny random Hugging Face MoE checkpoints built offline with transformers (for parity and conversion tests)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "granitemoe",
            "granitemoeshared", "phimoe", "glm4_moe", "ernie4_5_moe", "gpt_oss", "llama4",
            "dots1", "hunyuan_v1_moe", "minimax_m2", "glm4_moe_lite", "flex_olmo", "exaone_moe", "solar_open",
            "granitemoe_swa")
_COMMON = dict(
    vocab_size=256,
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family` (float32, eval mode) with non-trivial norm weights."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(_COMMON)
    if family == "mixtral":
        kw.update(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
        cfg_cls, model_cls = tf.MixtralConfig, tf.MixtralForCausalLM
    elif family == "qwen2_moe":
        kw.update(
            intermediate_size=192,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=128,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
        cfg_cls, model_cls = tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        kw.update(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=32, norm_topk_prob=True)
        cfg_cls, model_cls = tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM
    elif family == "olmoe":
        kw.update(intermediate_size=64, num_experts=4, num_experts_per_tok=2)
        cfg_cls, model_cls = tf.OlmoeConfig, tf.OlmoeForCausalLM
    elif family in ("deepseek_v2", "deepseek_v3"):
        # MLA with distinct nope / rope / value head dims; 8 routed experts in 4 groups, 2 shared, 1 dense layer
        kw.update(
            num_hidden_layers=3, num_key_value_heads=4, intermediate_size=192, moe_intermediate_size=64,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, n_group=4, topk_group=2,
        )
        if family == "deepseek_v2":  # V2 proper: group-limited softmax routing, no query LoRA (as V2-Lite)
            kw.update(q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5)
            cfg_cls, model_cls = tf.DeepseekV2Config, tf.DeepseekV2ForCausalLM
        else:
            kw.update(q_lora_rank=48, routed_scaling_factor=2.5, norm_topk_prob=True)
            cfg_cls, model_cls = tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM
    elif family in ("granitemoe", "granitemoeshared"):
        # non-trivial multipliers and biases (granite-3.0-1b-a400m: 12, 0.22, 1/64, 6)
        kw.update(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0,
                  residual_multiplier=0.22, attention_multiplier=0.03, logits_scaling=0.25, attention_bias=True)
        if family == "granitemoe":
            cfg_cls, model_cls = tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM
        else:
            kw.update(shared_intermediate_size=128)
            cfg_cls, model_cls = tf.GraniteMoeSharedConfig, tf.GraniteMoeSharedForCausalLM
    elif family == "phimoe":
        kw.update(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                  lm_head_bias=True, router_jitter_noise=0.2)  # a wide sparsemixer band: its masking matters
        cfg_cls, model_cls = tf.PhimoeConfig, tf.PhimoeForCausalLM
    elif family == "glm4_moe":  # GLM-4.5-Air-like: qk norm on, half-rotary heads, 1 dense layer, 1 shared expert
        kw.update(num_hidden_layers=3, head_dim=32, intermediate_size=192, moe_intermediate_size=64,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                  n_group=2, topk_group=1, routed_scaling_factor=1.5, attention_bias=True, use_qk_norm=True)
        cfg_cls, model_cls = tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM
    elif family == "ernie4_5_moe":  # tied embeddings, 1 dense layer then MoE, 2 shared experts
        kw.update(num_hidden_layers=3, intermediate_size=192, moe_intermediate_size=64, moe_num_experts=8, moe_k=2,
                  moe_num_shared_experts=2, moe_layer_start_index=1, tie_word_embeddings=True)
        cfg_cls, model_cls = tf.Ernie4_5_MoeConfig, tf.Ernie4_5_MoeForCausalLM
    elif family == "gpt_oss":  # sliding/full alternating with a window shorter than the test prompts; YaRN
        # swiglu_limit: one the tiny activations reach, so the clamp matters
        kw.update(num_hidden_layers=3, head_dim=32, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                  sliding_window=8, swiglu_limit=0.6, max_position_embeddings=2048,
                  rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                                       beta_slow=1.0, original_max_position_embeddings=64, truncate=False))
        cfg_cls, model_cls = tf.GptOssConfig, tf.GptOssForCausalLM
    elif family == "llama4":  # MoE every 2nd layer, NoPE every 4th, chunks shorter than the prompts
        kw.update(num_hidden_layers=4, head_dim=32, intermediate_size=64, intermediate_size_mlp=192,
                  num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8,
                  floor_scale=4, attn_scale=0.5)  # the query temperature grows within the prompt
        cfg_cls, model_cls = tf.Llama4TextConfig, tf.Llama4ForCausalLM
    elif family == "dots1":  # V3 router in 2 groups, 1 dense layer, 2 shared experts; the last 2 layers slide
        kw.update(num_hidden_layers=3, head_dim=32, intermediate_size=192, moe_intermediate_size=64,
                  n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
                  n_group=2, topk_group=1, routed_scaling_factor=1.5, sliding_window=8, max_window_layers=1)
        cfg_cls, model_cls = tf.Dots1Config, tf.Dots1ForCausalLM
    elif family == "hunyuan_v1_moe":  # q/k norms after RoPE, NTK-alpha RoPE, a shared MLP in every layer
        kw.update(head_dim=32, intermediate_size=64, num_experts=8, moe_topk=2,
                  rope_parameters=dict(rope_type="dynamic", alpha=1000.0, factor=1.0, rope_theta=10000.0))
        cfg_cls, model_cls = tf.HunYuanMoEV1Config, tf.HunYuanMoEV1ForCausalLM
    elif family == "minimax_m2":  # sigmoid router + choice bias, q/k norm over all heads, RoPE on half of each head
        kw.update(head_dim=32, rotary_dim=16, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)
        cfg_cls, model_cls = tf.MiniMaxM2Config, tf.MiniMaxM2ForCausalLM
    elif family == "glm4_moe_lite":  # MLA with q LoRA under the V3 router; layers dense, MoE, dense (mlp_layer_types)
        kw.update(num_hidden_layers=3, num_key_value_heads=4, intermediate_size=192, moe_intermediate_size=64,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                  mlp_layer_types=["dense", "sparse", "dense"], kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=24, rms_norm_eps=1e-5)
        cfg_cls, model_cls = tf.Glm4MoeLiteConfig, tf.Glm4MoeLiteForCausalLM
    elif family == "flex_olmo":  # post-norm blocks, q/k norm over all heads
        kw.update(intermediate_size=64, num_experts=4, num_experts_per_tok=2)
        cfg_cls, model_cls = tf.FlexOlmoConfig, tf.FlexOlmoForCausalLM
    elif family == "exaone_moe":  # local (sliding, RoPE) and global (NoPE) layers alternating, 1 dense layer, V3 router
        kw.update(num_hidden_layers=4, head_dim=32, intermediate_size=192, moe_intermediate_size=64, num_experts=8,
                  num_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
                  sliding_window=8, sliding_window_pattern=2)
        cfg_cls, model_cls = tf.ExaoneMoeConfig, tf.ExaoneMoeForCausalLM
    elif family == "solar_open":  # Llama attention, V3 router in 2 groups and a shared expert in every layer
        kw.update(head_dim=32, moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                  n_group=2, topk_group=1, routed_scaling_factor=1.5)
        cfg_cls, model_cls = tf.SolarOpenConfig, tf.SolarOpenForCausalLM
    elif family == "granitemoe_swa":  # Granite's multipliers, sinks, window 8 on layers 1-2, layer 0 full and NoPE
        kw.update(num_hidden_layers=3, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                  shared_intermediate_size=128, embedding_multiplier=12.0, residual_multiplier=0.22,
                  attention_multiplier=0.03, logits_scaling=0.25, sliding_window=8,
                  layer_rope_theta=[0, 10000.0, 10000.0])
        cfg_cls, model_cls = tf.GraniteMoeSWAConfig, tf.GraniteMoeSWAForCausalLM
    else:
        raise ValueError(family)
    kw.update(overrides)
    model = model_cls(cfg_cls(**kw)).float().eval()
    # the first four families keep their stacked experts at std 0.02: older tests' thresholds were measured so
    randomize(model, stacked_std=0.02 if family in FAMILIES[:4] else 0.08)
    return model


def randomize(model, stacked_std: float = 0.08) -> None:
    """Random weights with non-trivial norms and choice biases (a fresh model's are ones and zeros):
    matrices std 0.08, stacked [E, ...] expert tensors `stacked_std`, vectors 0.02."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08 if p.dim() == 2 else stacked_std)
            else:
                p.normal_(0.0, 0.02)
        for name, b in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith("e_score_correction_bias"):  # a buffer (DeepSeek, GLM) or a parameter (ERNIE)
                b.normal_(0.0, 0.05)


def save_tiny_checkpoint(family: str, out: Path, seed: int = 0, **overrides) -> Path:
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(out)
    write_byte_tokenizer(out)
    return Path(out)


def write_byte_tokenizer(out: Path) -> None:
    """A 256-token byte-level BPE tokenizer (no merges) so tiny models can run text end to end."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    ordered = sorted(alphabet, key=lambda ch: ord(ch))
    vocab = {ch: i for i, ch in enumerate(ordered)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(Path(out) / "tokenizer.json"))
    (Path(out) / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
