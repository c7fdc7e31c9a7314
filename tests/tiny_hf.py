"""Tiny random Hugging Face MoE checkpoints built offline with transformers (for parity and conversion tests)."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
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
    else:
        raise ValueError(family)
    kw.update(overrides)
    model = model_cls(cfg_cls(**kw)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(0.0, 0.02)
    return model


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
