"""Model families as tables: HF architecture -> how its config and tensor names map onto the canonical ones.

Adding a family means adding a `Family` row (and, if its config differs, a small config function), not a
model file. The name table covers the layouts real hub checkpoints and transformers 5 `save_pretrained` use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from d2moe.config import ModelConfig


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message is one line a user can act on."""


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    moe_module: str  # "block_sparse_moe" (Mixtral) or "mlp"
    expert_matrices: dict[str, str]  # canonical w1/w3/w2 -> HF projection name
    config_fn: Callable[[dict[str, Any], str], ModelConfig]


def _get(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    return default


def _rope_theta(hf: dict[str, Any]) -> float:
    """transformers 4 writes `rope_theta`; transformers 5 writes `rope_parameters: {rope_theta, rope_type}`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise ConversionError(f"rope type {kind!r} is not supported yet (only default RoPE)")
    theta = hf.get("rope_theta", params.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def _eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(int(i) for i in ids if 0 <= int(i) < int(hf["vocab_size"]))


def _base(hf: dict[str, Any], family: str) -> dict[str, Any]:
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        bos = hf.get("bos_token_id")
        return dict(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(_get(hf, "num_key_value_heads", default=heads)),
            head_dim=int(_get(hf, "head_dim", default=hidden // heads)),
            rope_theta=_rope_theta(hf),
            rms_norm_eps=float(_get(hf, "rms_norm_eps", default=1e-6)),
            max_position=int(_get(hf, "max_position_embeddings", default=4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=int(bos) if bos is not None and 0 <= int(bos) < int(hf["vocab_size"]) else None,
            eos_token_ids=_eos_ids(hf),
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None


def _mixtral(hf: dict[str, Any], family: str) -> ModelConfig:
    return ModelConfig(
        **_base(hf, family),
        num_experts=int(hf["num_local_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["intermediate_size"]),
        norm_topk_prob=True,
    )


def _sparse_layers(hf: dict[str, Any]) -> tuple[int, ...]:
    """Qwen-style: layer L is dense if listed in mlp_only_layers or off the decoder_sparse_step grid."""
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    only = set(hf.get("mlp_only_layers") or [])
    n = int(hf["num_hidden_layers"])
    return tuple(L for L in range(n) if L in only or (L + 1) % step != 0)


def _qwen_moe(hf: dict[str, Any], family: str) -> ModelConfig:
    dense = _sparse_layers(hf)
    shared = int(hf.get("shared_expert_intermediate_size", 0) or 0)
    base = _base(hf, family)
    return ModelConfig(
        **base,
        attn_bias=bool(hf.get("qkv_bias", hf.get("attention_bias", family == "qwen2_moe"))),
        qk_norm="head" if family == "qwen3_moe" else "none",
        num_experts=int(_get(hf, "num_experts", "num_local_experts")),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate=shared,
        shared_expert_gate=shared > 0,
        dense_layers=dense,
        dense_intermediate=int(hf.get("intermediate_size", 0)) if dense else 0,
    )


def _olmoe(hf: dict[str, Any], family: str) -> ModelConfig:
    if hf.get("clip_qkv") is not None:
        raise ConversionError("OLMoE with clip_qkv is not supported yet")
    return ModelConfig(
        **_base(hf, family),
        attn_bias=bool(hf.get("attention_bias", False)),
        qk_norm="full",
        num_experts=int(hf["num_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


_SWIGLU_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("MixtralForCausalLM",), "block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"}, _mixtral),
    Family("qwen2_moe", ("Qwen2MoeForCausalLM",), "mlp", _SWIGLU_PROJ, _qwen_moe),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "mlp", _SWIGLU_PROJ, _qwen_moe),
    Family("olmoe", ("OlmoeForCausalLM",), "mlp", _SWIGLU_PROJ, _olmoe),
)


def family_for(hf_config: dict[str, Any]) -> Family:
    archs = hf_config.get("architectures") or []
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    known = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise ConversionError(f"unsupported architecture {archs or '(none given)'}; d2moe converts: {known}")


_ATTN = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_norm": "q_norm", "k_norm": "k_norm"}
_FFN = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def canonical_name(fam: Family, name: str) -> str | None:
    """HF tensor name -> canonical name (see models/names.py); None for tensors d2moe does not use."""
    top = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
    if name in top:
        return top[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    L, rest = m.group(1), m.group(2)
    p = f"layers.{L}."
    if rest == "input_layernorm.weight":
        return p + "attn_norm"
    if rest == "post_attention_layernorm.weight":
        return p + "ffn_norm"
    if a := re.fullmatch(r"self_attn\.(\w+)\.(weight|bias)", rest):
        proj, kind = a.groups()
        if proj in _ATTN:
            canon = _ATTN[proj]
            return p + (canon if kind == "weight" else "b" + canon[1])
        return None
    mod = re.escape(fam.moe_module)
    if rest == f"{fam.moe_module}.gate.weight":
        return p + "router"
    if e := re.fullmatch(mod + r"\.experts\.(\d+)\.(\w+)\.weight", rest):
        proj = {v: k for k, v in fam.expert_matrices.items()}.get(e.group(2))
        return f"{p}experts.{e.group(1)}.{proj}" if proj else None
    if s := re.fullmatch(r"mlp\.shared_experts?\.(\w+)\.weight", rest):
        return p + "shared." + _FFN[s.group(1)] if s.group(1) in _FFN else None
    if rest == "mlp.shared_expert_gate.weight":
        return p + "shared_gate"
    if d := re.fullmatch(r"mlp\.(gate_proj|up_proj|down_proj)\.weight", rest):
        return p + "ffn." + _FFN[d.group(1)]
    return None
