"""The config.json of an exported checkpoint.

A store keeps its canonical config and the path of the checkpoint it came from, not that checkpoint's
config.json. Export uses the source's config.json when it is still there (or one given with --hf-config),
else rebuilds one for the families whose configs are simple enough (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).
Either way the converter's own config function must turn it back into exactly the store's model config,
so the exported checkpoint describes the model that was exported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from d2moe.config import ModelConfig
from d2moe.convert.families import ConversionError, Family
from d2moe.storage.format import StoreConfig

log = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# keys that describe weights the export does not write: quantized source releases, remote code, MTP layers
_DROP = ("quantization_config", "auto_map")


def _rope(m: ModelConfig) -> dict[str, Any]:
    """RoPE in both spellings: transformers 5's rope_parameters and transformers 4's rope_theta/rope_scaling."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    rs = m.rope_scaling
    if rs is not None:
        if rs.kind == "longrope":
            raise ConversionError("cannot rebuild a LongRoPE config (its long factors are not in the store); "
                                  "pass the source's config.json with --hf-config")
        params.update(rope_type=rs.kind, factor=rs.factor, original_max_position_embeddings=rs.original_max_position)
        if rs.kind == "yarn":
            params.update(beta_fast=rs.beta_fast, beta_slow=rs.beta_slow, attention_factor=rs.attention_factor,
                          truncate=rs.truncate)
        else:
            params.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
    legacy = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": m.rope_theta, "rope_parameters": params,
            "rope_scaling": legacy if rs is not None else None}


def _common(m: ModelConfig, arch: str, model_type: str) -> dict[str, Any]:
    eos = list(m.eos_token_ids)
    return {
        "architectures": [arch], "model_type": model_type, "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_position,
        "rms_norm_eps": m.rms_norm_eps, "tie_word_embeddings": m.tie_word_embeddings, "bos_token_id": m.bos_token_id,
        "eos_token_id": (eos[0] if len(eos) == 1 else eos) if eos else None, "num_experts_per_tok": m.top_k,
        **_rope(m),
    }


def _qwen(m: ModelConfig, arch: str, model_type: str) -> dict[str, Any]:
    d = _common(m, arch, model_type)
    d.update(num_experts=m.num_experts, moe_intermediate_size=m.expert_intermediate, norm_topk_prob=m.norm_topk_prob,
             decoder_sparse_step=1, mlp_only_layers=list(m.dense_layers),
             intermediate_size=m.dense_intermediate or m.expert_intermediate, use_sliding_window=False)
    if model_type == "qwen2_moe":
        d.update(qkv_bias=m.attn_bias, shared_expert_intermediate_size=m.shared_expert_intermediate)
    else:
        d.update(attention_bias=m.attn_bias)
    return d


def _rebuild(m: ModelConfig) -> dict[str, Any]:
    if m.family == "mixtral":
        d = _common(m, "MixtralForCausalLM", "mixtral")
        d.update(num_local_experts=m.num_experts, intermediate_size=m.expert_intermediate, sliding_window=None)
        return d
    if m.family == "qwen2_moe":
        return _qwen(m, "Qwen2MoeForCausalLM", "qwen2_moe")
    if m.family == "qwen3_moe":
        return _qwen(m, "Qwen3MoeForCausalLM", "qwen3_moe")
    if m.family == "olmoe":
        d = _common(m, "OlmoeForCausalLM", "olmoe")
        d.update(num_experts=m.num_experts, intermediate_size=m.expert_intermediate, norm_topk_prob=m.norm_topk_prob,
                 attention_bias=m.attn_bias, clip_qkv=None)
        return d
    raise ConversionError(f"the store does not keep its source's config.json, and {m.family} configs are not "
                          "rebuilt (mixtral, qwen2_moe, qwen3_moe and olmoe are); pass it with --hf-config")


def _differences(fam: Family, hf: dict[str, Any], model: ModelConfig) -> list[str]:
    """Fields where the converter's reading of `hf` differs from the store's model config (or why it fails)."""
    try:
        got = fam.config_fn(hf, fam.name)
    except (ConversionError, KeyError, TypeError, ValueError) as e:
        return [f"unreadable ({e})"]
    return [f.name for f in dataclasses.fields(ModelConfig) if getattr(got, f.name) != getattr(model, f.name)]


def _text_only(hf: dict[str, Any]) -> dict[str, Any]:
    """A multimodal Llama 4 config -> its text model's (the store holds the text model only)."""
    if "Llama4ForConditionalGeneration" not in (hf.get("architectures") or []):
        return hf
    return {**hf["text_config"], "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text"}


def _read(path: Path) -> dict[str, Any] | None:
    path = path / "config.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def export_config(cfg: StoreConfig, fam: Family, dtype: torch.dtype, given: Path | None = None) -> dict[str, Any]:
    """config.json for the export: `given`, else the store's source's, else rebuilt; always checked."""
    model = cfg.model
    if given is not None:
        hf = _read(Path(given))
        if hf is None:
            raise ConversionError(f"{given}: not a readable config.json")
        bad = _differences(fam, _text_only(hf), model)
        if bad:
            raise ConversionError(f"{given} does not describe this store ({', '.join(bad[:4])} differ)")
    else:
        hf = _read(Path(cfg.source)) if cfg.source else None
        if hf is not None and _differences(fam, _text_only(hf), model):
            log.warning("%s no longer matches the store; rebuilding config.json", cfg.source)
            hf = None
        if hf is None:
            hf = _rebuild(model)
            bad = _differences(fam, hf, model)
            if bad:
                raise ConversionError(f"cannot rebuild config.json for this store ({', '.join(bad[:4])} differ); "
                                      "pass the source's config.json with --hf-config")
    hf = {k: v for k, v in _text_only(hf).items() if k not in _DROP}
    if "num_nextn_predict_layers" in hf:
        hf["num_nextn_predict_layers"] = 0  # DeepSeek-V3's MTP layers are not in the store
    hf["dtype"] = hf["torch_dtype"] = _DTYPE_NAMES[dtype]  # transformers 5 and 4 spellings
    return hf
