"""Model families as tables: HF architecture -> how its config and tensor names map onto the canonical ones.

Adding a family means adding a `Family` row (and, if its config differs, a small config function in
convert/family_configs.py), not a model file. The name table covers the layouts real hub checkpoints and
transformers 5 `save_pretrained` use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from d2moe.config import ModelConfig
from d2moe.convert.family_configs import (
    deepseek_config,
    dots1_config,
    ernie4_5_moe_config,
    ernie_fix,
    exaone_moe_config,
    flex_olmo_config,
    glm4_moe_config,
    glm4_moe_lite_config,
    gpt_oss_config,
    gpt_oss_names,
    granite_config,
    granite_names,
    granitemoe_swa_config,
    hunyuan_moe_config,
    llama4_config,
    llama4_names,
    minimax_m2_config,
    mixtral_config,
    mla_rope_rows_halved,
    olmoe_config,
    phimoe_config,
    post_norm_names,
    qwen_moe_config,
    rope_rows_halved,
    solar_open_config,
)
from d2moe.convert.hf_config import ConversionError, Fix, Part, SpecialNames

__all__ = ["FAMILIES", "ConversionError", "Family", "Part", "canonical_name", "family_for", "tensor_parts"]


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    moe_module: str  # "block_sparse_moe" (Mixtral) or "mlp"
    expert_matrices: dict[str, str]  # canonical w1/w3/w2 -> HF projection name
    config_fn: Callable[[dict[str, Any], str], ModelConfig]
    special_names: SpecialNames | None = None
    fix: Fix | None = None


_SWIGLU_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

_MIXTRAL_NAMES = {"w1": "w1", "w3": "w3", "w2": "w2"}
_MLA_FIX = mla_rope_rows_halved

FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("MixtralForCausalLM",), "block_sparse_moe", _MIXTRAL_NAMES, mixtral_config),
    Family("qwen2_moe", ("Qwen2MoeForCausalLM",), "mlp", _SWIGLU_PROJ, qwen_moe_config),
    Family("qwen3_moe", ("Qwen3MoeForCausalLM",), "mlp", _SWIGLU_PROJ, qwen_moe_config),
    Family("olmoe", ("OlmoeForCausalLM",), "mlp", _SWIGLU_PROJ, olmoe_config),
    Family("deepseek_v2", ("DeepseekV2ForCausalLM",), "mlp", _SWIGLU_PROJ, deepseek_config, fix=_MLA_FIX),
    Family("deepseek_v3", ("DeepseekV3ForCausalLM",), "mlp", _SWIGLU_PROJ, deepseek_config, fix=_MLA_FIX),
    Family("glm4_moe", ("Glm4MoeForCausalLM",), "mlp", _SWIGLU_PROJ, glm4_moe_config),
    Family("ernie4_5_moe", ("Ernie4_5_MoeForCausalLM",), "mlp", _SWIGLU_PROJ, ernie4_5_moe_config, fix=ernie_fix),
    Family("gpt_oss", ("GptOssForCausalLM",), "mlp", {}, gpt_oss_config, special_names=gpt_oss_names),
    Family("llama4", ("Llama4ForCausalLM", "Llama4ForConditionalGeneration"), "feed_forward", {}, llama4_config,
           special_names=llama4_names, fix=rope_rows_halved),
    Family("granitemoe", ("GraniteMoeForCausalLM",), "block_sparse_moe", {}, granite_config,
           special_names=granite_names),
    Family("granitemoeshared", ("GraniteMoeSharedForCausalLM",), "block_sparse_moe", {}, granite_config,
           special_names=granite_names),
    Family("granitemoe_swa", ("GraniteMoeSWAForCausalLM",), "block_sparse_moe", {}, granitemoe_swa_config,
           special_names=granite_names),
    Family("phimoe", ("PhimoeForCausalLM", "PhiMoEForCausalLM"), "block_sparse_moe", _MIXTRAL_NAMES, phimoe_config),
    Family("dots1", ("Dots1ForCausalLM",), "mlp", _SWIGLU_PROJ, dots1_config),
    Family("hunyuan_v1_moe", ("HunYuanMoEV1ForCausalLM",), "mlp", _SWIGLU_PROJ, hunyuan_moe_config),
    Family("glm4_moe_lite", ("Glm4MoeLiteForCausalLM",), "mlp", _SWIGLU_PROJ, glm4_moe_lite_config, fix=_MLA_FIX),
    Family("flex_olmo", ("FlexOlmoForCausalLM",), "mlp", _SWIGLU_PROJ, flex_olmo_config, special_names=post_norm_names),
    Family("exaone_moe", ("ExaoneMoeForCausalLM",), "mlp", _SWIGLU_PROJ, exaone_moe_config),
    Family("solar_open", ("SolarOpenForCausalLM",), "mlp", _SWIGLU_PROJ, solar_open_config),
    Family("minimax_m2", ("MiniMaxM2ForCausalLM",), "block_sparse_moe", _MIXTRAL_NAMES, minimax_m2_config),
)


def family_for(hf_config: dict[str, Any]) -> Family:
    archs = hf_config.get("architectures") or []
    for fam in FAMILIES:
        if any(a in fam.architectures for a in archs):
            return fam
    known = ", ".join(a for f in FAMILIES for a in f.architectures)
    hybrid = any(h in a for a in archs for h in _HYBRID_MARKS) or "MiniMaxForCausalLM" in archs
    why = " (layers with linear attention or state-space/Mamba mixers are not supported)" if hybrid else ""
    raise ConversionError(f"unsupported architecture {archs or '(none given)'}{why}; d2moe converts: {known}")


# architecture names of hybrid models: linear-attention or state-space (Mamba) layers among the attention ones
_HYBRID_MARKS = ("Hybrid", "Mamba", "Jamba", "Bamba", "Zamba", "Qwen3Next", "NemotronH", "FalconH1", "Lfm2")


_ATTN = {
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_norm": "q_norm", "k_norm": "k_norm",
    # multi-head latent attention (DeepSeek)
    "q_a_proj": "wq_a", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_b_proj": "wkv_b",
    "q_a_layernorm": "q_a_norm", "kv_a_layernorm": "kv_a_norm",
    "query_layernorm": "q_norm", "key_layernorm": "k_norm",  # HunYuan
}
_FFN = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def canonical_name(fam: Family, name: str) -> str | None:
    """HF tensor name -> canonical name (see models/names.py); None for tensors d2moe does not use."""
    name = name.removeprefix("language_model.")  # multimodal checkpoints' text model (Llama 4)
    top = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head",
           "model.norm.bias": "norm_b", "lm_head.bias": "lm_head_b"}
    if name in top:
        return top[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    L, rest = m.group(1), m.group(2)
    p = f"layers.{L}."
    if rest.startswith(("input_layernorm.", "post_attention_layernorm.")):
        which, kind = rest.split(".")
        return p + ("attn_norm" if which == "input_layernorm" else "ffn_norm") + ("_b" if kind == "bias" else "")
    if rest == "self_attn.sinks":  # GraniteMoeSWA (GPT-OSS's are read by its own table)
        return p + "sinks"
    if a := re.fullmatch(r"self_attn\.(\w+)\.(weight|bias)", rest):
        proj, kind = a.groups()
        if proj in _ATTN:
            canon = _ATTN[proj]
            return p + (canon if kind == "weight" else "b" + canon[1:])
        return None
    mod = re.escape(fam.moe_module)
    if rest in (f"{fam.moe_module}.gate.weight", f"{fam.moe_module}.router.weight",
                f"{fam.moe_module}.gate.wg.weight"):  # HunYuan
        return p + "router"
    if rest in (f"{fam.moe_module}.gate.e_score_correction_bias",  # DeepSeek-V3, GLM
                f"{fam.moe_module}.moe_statics.e_score_correction_bias",  # ERNIE
                f"{fam.moe_module}.e_score_correction_bias"):  # MiniMax-M2, K-EXAONE
        return p + "router_bias"
    if e := re.fullmatch(mod + r"\.experts\.(\d+)\.(\w+)\.weight", rest):
        proj = {v: k for k, v in fam.expert_matrices.items()}.get(e.group(2))
        return f"{p}experts.{e.group(1)}.{proj}" if proj else None
    if s := re.fullmatch(rf"(?:mlp|{mod})\.shared_(?:experts?|mlp)\.(\w+)\.weight", rest):  # shared_mlp: HunYuan
        return p + "shared." + _FFN[s.group(1)] if s.group(1) in _FFN else None
    if rest == "mlp.shared_expert_gate.weight":
        return p + "shared_gate"
    if d := re.fullmatch(rf"(?:mlp|{mod})\.(gate_proj|up_proj|down_proj)\.weight", rest):
        return p + "ffn." + _FFN[d.group(1)]
    return None


def tensor_parts(fam: Family, model: ModelConfig, name: str) -> list[tuple[str, Part | None]]:
    """HF tensor name -> the canonical tensors it holds (usually one; none for what d2moe does not use,
    such as DeepSeek-V3's multi-token-prediction layers past num_layers)."""
    if fam.special_names is not None and (parts := fam.special_names(model, name)) is not None:
        return list(parts)
    canon = canonical_name(fam, name)
    if canon is None:
        return []
    if (m := re.match(r"layers\.(\d+)\.", canon)) and int(m.group(1)) >= model.num_layers:
        return []
    return [(canon, None)]
