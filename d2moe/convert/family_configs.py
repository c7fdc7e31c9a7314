"""Each family's HF config -> ModelConfig function, and for families that need them, the names their
checkpoints store differently from the common table and the per-tensor rewrites (convert/families.py puts
them in one table row per family)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from d2moe.config import ModelConfig
from d2moe.convert.hf_config import (
    ConversionError,
    Part,
    base_fields,
    hf_get,
    rope_params,
    rope_theta,
    yarn_mscale,
)


def mixtral_config(hf: dict[str, Any], family: str) -> ModelConfig:
    return ModelConfig(
        **base_fields(hf, family),
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


def qwen_moe_config(hf: dict[str, Any], family: str) -> ModelConfig:
    dense = _sparse_layers(hf)
    shared = int(hf.get("shared_expert_intermediate_size", 0) or 0)
    base = base_fields(hf, family)
    return ModelConfig(
        **base,
        attn_bias=bool(hf.get("qkv_bias", hf.get("attention_bias", family == "qwen2_moe"))),
        qk_norm="head" if family == "qwen3_moe" else "none",
        num_experts=int(hf_get(hf, "num_experts", "num_local_experts")),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate=shared,
        shared_expert_gate=shared > 0,
        dense_layers=dense,
        dense_intermediate=int(hf.get("intermediate_size", 0)) if dense else 0,
    )


def olmoe_config(hf: dict[str, Any], family: str) -> ModelConfig:
    if hf.get("clip_qkv") is not None:
        raise ConversionError("OLMoE with clip_qkv is not supported yet")
    return ModelConfig(
        **base_fields(hf, family),
        attn_bias=bool(hf.get("attention_bias", False)),
        qk_norm="full",
        num_experts=int(hf["num_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )



def flex_olmo_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """FlexOlmo: OLMoE's router and q/k norms over all heads, with OLMo 2's post-norm blocks (each block's
    output is normed before the residual add; no input norms)."""
    return ModelConfig(
        **base_fields(hf, family),
        attn_bias=bool(hf.get("attention_bias", False)),
        qk_norm="full",
        post_norm=True,
        num_experts=int(hf_get(hf, "num_experts", "num_local_experts")),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def post_norm_names(model: ModelConfig, name: str) -> list[tuple[str, Part | None]] | None:
    """Post-norm layers (FlexOlmo): post_attention_layernorm norms the attention's output (canonical attn_norm),
    post_feedforward_layernorm the FFN's (ffn_norm); there is no input_layernorm."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(input|post_attention|post_feedforward)_layernorm\.weight", name)
    if not m:
        return None
    L = int(m.group(1))
    if L >= model.num_layers or m.group(2) == "input":
        return []
    return [(f"layers.{L}." + ("attn_norm" if m.group(2) == "post_attention" else "ffn_norm"), None)]

def deepseek_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """DeepSeek-V2/V3: MLA, shared experts, leading dense layers, group-limited routing. V2 scores by
    softmax (greedy or group-limited by each group's best expert); V3 by sigmoid plus a choice-only bias,
    groups ranked by their best two experts."""
    base = base_fields(hf, family)
    mla = mla_fields(hf, base)
    v3 = family == "deepseek_v3"
    method = hf.get("topk_method") or ("noaux_tc" if v3 else "greedy")
    scoring = hf.get("scoring_func") or ("sigmoid" if v3 else "softmax")
    known = {("noaux_tc", "sigmoid")} if v3 else {("greedy", "softmax"), ("group_limited_greedy", "softmax")}
    if (method, scoring) not in known:
        raise ConversionError(f"{family} with topk_method={method!r}, scoring_func={scoring!r} is not supported")
    grouped = method != "greedy"
    n, first, freq = int(hf["num_hidden_layers"]), int(hf.get("first_k_dense_replace") or 0), int(
        hf.get("moe_layer_freq") or 1)
    dense = tuple(L for L in range(n) if L < first or L % freq)
    moe_i = int(hf["moe_intermediate_size"])
    return ModelConfig(
        **base,
        **mla,
        num_experts=int(hf_get(hf, "n_routed_experts", "num_local_experts")),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=moe_i,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        router_scoring=scoring,
        router_bias=v3,
        expert_groups=int(hf.get("n_group") or 1) if grouped else 1,
        topk_groups=int(hf.get("topk_group") or 1) if grouped else 1,
        group_score="top2" if v3 else "max",
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        shared_expert_intermediate=moe_i * int(hf.get("n_shared_experts") or 0),
        dense_layers=dense,
        dense_intermediate=int(hf["intermediate_size"]) if dense else 0,
    )


def mla_fields(hf: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Multi-head latent attention's fields (DeepSeek-V2/V3, GLM-4.7-Flash); sets `base`'s head_dim to the q/k
    head dim and its KV heads to its heads. The scale is 1/sqrt(q/k head dim), times YaRN's mscale squared."""
    dn, dr = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
    base.update(head_dim=dn + dr, num_kv_heads=base["num_heads"])  # MLA: every head has its own k and v
    scale = (dn + dr) ** -0.5
    params = rope_params(hf)
    if base["rope_scaling"] is not None and params.get("mscale_all_dim"):
        scale *= yarn_mscale(base["rope_scaling"].factor, float(params["mscale_all_dim"])) ** 2
    return dict(attention="mla", q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
                qk_rope_head_dim=dr, v_head_dim=int(hf["v_head_dim"]), softmax_scale=scale)


def glm4_moe_lite_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """GLM-4.7-Flash (Glm4MoeLite): DeepSeek-V3's MLA (interleaved RoPE pairs, reordered at conversion; latent
    norms at transformers' default eps 1e-6) under GLM-4.5's MoE: V3 router, shared experts, dense layers per
    mlp_layer_types (default: the first)."""
    if float(rope_params(hf).get("partial_rotary_factor") or 1.0) != 1.0:
        raise ConversionError("GLM-4.7-Flash with partial_rotary_factor < 1 is not supported")
    base = base_fields(hf, family)
    mla = mla_fields(hf, base)
    n = int(hf["num_hidden_layers"])
    types = hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    return ModelConfig(
        **base,
        **mla,
        latent_norm_eps=1e-6,
        **v3_moe_fields(hf, tuple(L for L, t in enumerate(types[:n]) if t == "dense")),
    )


def mla_rope_rows_halved(hf: dict[str, Any], model: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...; d2moe's RoPE rotates halves (x_i with
    x_{i+d/2}). Reordering the rotary output rows of wq / wq_b (per head) and wkv_a (its last dr rows) to
    evens-then-odds makes the half rotation compute the same q . k (V3 with rope_interleave=false is left)."""
    if hf.get("rope_interleave") is False:
        return t
    kind = name.rsplit(".", 1)[-1]
    dr = model.qk_rope_head_dim
    perm = torch.cat((torch.arange(0, dr, 2), torch.arange(1, dr, 2)))
    if kind in ("wq", "wq_b"):
        heads = t.view(model.num_heads, model.head_dim, *t.shape[1:])  # [nH, dn + dr, ...]
        return torch.cat((heads[:, : -dr], heads[:, -dr:][:, perm]), dim=1).reshape(t.shape)
    if kind in ("wkv_a", "bkv_a"):
        r = model.kv_lora_rank
        return torch.cat((t[:r], t[r:][perm]))
    return t


def granite_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """GraniteMoE(Shared): Mixtral-like, plus multipliers on the embeddings, each block's output, the
    attention scores (in place of 1/sqrt(d)) and the logits (divided by logits_scaling)."""
    return ModelConfig(
        **base_fields(hf, family),
        attn_bias=bool(hf.get("attention_bias", False)),
        softmax_scale=float(hf.get("attention_multiplier") or 1.0),
        embedding_multiplier=float(hf.get("embedding_multiplier") or 1.0),
        residual_multiplier=float(hf.get("residual_multiplier") or 1.0),
        logit_scale=1.0 / float(hf.get("logits_scaling") or 1.0),
        num_experts=int(hf["num_local_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["intermediate_size"]),
        norm_topk_prob=True,  # softmax over the top-k logits
        shared_expert_intermediate=int(hf.get("shared_intermediate_size") or 0),
    )



def granitemoe_swa_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """GraniteMoeSWA: GraniteMoeShared with attention sinks, sliding layers (`layer_types`, default: every 4th
    layer full) and per-layer RoPE bases where 0 means no RoPE (NoPE); the other layers must share one base."""
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or ["full_attention" if L % 4 == 0 else "sliding_attention" for L in range(n)]
    thetas = [float(t) for t in (hf.get("layer_rope_theta") or [])[:n]]
    bases = {t for t in thetas if t}
    if len(bases) > 1:
        raise ConversionError(f"GraniteMoeSWA with several RoPE bases ({sorted(bases)}) is not supported; d2moe "
                              "needs one base (0: NoPE layers are fine)")
    hf = {**hf, "rope_theta": bases.pop()} if bases else hf
    cfg = granite_config(hf, family)
    return dataclasses.replace(cfg, attention_sinks=True, **sliding_fields(hf, types),
                               nope_layers=tuple(L for L, t in enumerate(thetas) if not t))

def granite_names(model: ModelConfig, name: str) -> list[tuple[str, Part | None]] | None:
    """Granite stores each layer's experts fused: input_linear [E, 2I, H] (gate rows, then up rows) and
    output_linear [E, H, I] (transformers 5 in memory, and GraniteMoeSWA's checkpoints: experts.gate_up_proj /
    down_proj, same layout); the shared expert the same way without E. The router is `router.layer` (or
    `router`)."""
    if re.search(r"\.experts\.(gate_up_proj|down_proj)$", name):  # GraniteMoeSWA saves these without .weight
        name += ".weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(block_sparse_moe|shared_mlp)\.(\w+(?:\.\w+)?)\.weight", name)
    if not m:
        return None
    L, where, what = int(m.group(1)), m.group(2), m.group(3)
    p = f"layers.{L}."
    if L >= model.num_layers:
        return []
    if where == "block_sparse_moe" and what in ("router.layer", "router"):
        return [(p + "router", None)]
    up, down = what in ("input_linear", "experts.gate_up_proj"), what in ("output_linear", "experts.down_proj")
    if not (up or down):
        return None
    if where == "shared_mlp":
        I = model.shared_expert_intermediate
        return [(p + "shared.w1", Part(rows=(0, I, 1))), (p + "shared.w3", Part(rows=(I, 2 * I, 1)))] if up else [
            (p + "shared.w2", None)]
    I = model.expert_intermediate
    if up:
        return [(f"{p}experts.{e}.{w}", Part(e, rows)) for e in range(model.num_experts)
                for w, rows in (("w1", (0, I, 1)), ("w3", (I, 2 * I, 1)))]
    return [(f"{p}experts.{e}.w2", Part(e)) for e in range(model.num_experts)]


def phimoe_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """PhiMoE: Mixtral layout with LayerNorms (with bias), attention and head biases, SparseMixer routing
    (always two experts), LongRoPE. A sliding window, if shorter than the context, caps the context."""
    if int(hf["num_experts_per_tok"]) != 2:
        raise ConversionError("PhiMoE's sparsemixer routing picks exactly 2 experts; num_experts_per_tok must be 2")
    base = base_fields(hf, family)
    window = hf.get("sliding_window")
    if window:
        base["max_position"] = min(base["max_position"], int(window))
    return ModelConfig(
        **base,
        norm="layer",
        attn_bias=bool(hf.get("attention_bias", False)),
        lm_head_bias=bool(hf.get("lm_head_bias", False)),
        num_experts=int(hf["num_local_experts"]),
        top_k=2,
        expert_intermediate=int(hf["intermediate_size"]),
        router_scoring="sparsemixer",
        sparsemixer_eps=float(hf.get("router_jitter_noise", 0.01)),
    )


def v3_moe_fields(hf: dict[str, Any], dense: tuple[int, ...]) -> dict[str, Any]:
    """The MoE fields of the families built on DeepSeek-V3's router (GLM-4.5, dots1, GLM-4.7-Flash, K-EXAONE):
    sigmoid scores with a choice-only bias, groups ranked by their best two, routed scaling, shared experts of
    the routed experts' width, `dense` layers with a plain FFN."""
    moe_i = int(hf["moe_intermediate_size"])
    return dict(
        num_experts=int(hf_get(hf, "n_routed_experts", "num_experts", "num_local_experts")),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=moe_i,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        router_scoring="sigmoid",
        router_bias=True,
        expert_groups=int(hf.get("n_group") or 1),
        topk_groups=int(hf.get("topk_group") or 1),
        group_score="top2",
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        shared_expert_intermediate=moe_i * int(hf_get(hf, "n_shared_experts", "num_shared_experts", default=0)),
        dense_layers=dense,
        dense_intermediate=int(hf["intermediate_size"]) if dense else 0,
    )


def first_dense(hf: dict[str, Any]) -> tuple[int, ...]:
    """Dense FFN layers: those `mlp_layer_types` calls dense, else the first `first_k_dense_replace`."""
    n = int(hf["num_hidden_layers"])
    if types := hf.get("mlp_layer_types"):
        return tuple(L for L, t in enumerate(types[:n]) if t == "dense")
    return tuple(range(min(int(hf.get("first_k_dense_replace") or 0), n)))


def sliding_fields(hf: dict[str, Any], types: list[str] | None) -> dict[str, Any]:
    """sliding_window / sliding_layers from per-layer `types` ("sliding_attention" slides; None: none do)."""
    window = int(hf.get("sliding_window") or 0)
    layers = tuple(L for L, t in enumerate((types or [])[: int(hf["num_hidden_layers"])]) if t == "sliding_attention")
    return dict(sliding_window=window, sliding_layers=layers) if window and layers else {}


def glm4_moe_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """GLM-4.5 MoE: DeepSeek-V3's router, shared experts and leading dense layers on GQA attention with
    q/k/v biases, optional per-head q/k norm and RoPE on the leading half of each head."""
    base = base_fields(hf, family)
    partial = rope_params(hf).get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 0.5
    return ModelConfig(
        **base,
        attn_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head" if hf.get("use_qk_norm") else "none",
        rotary_dim=int(base["head_dim"] * float(partial)),
        **v3_moe_fields(hf, first_dense(hf)),
    )


def dots1_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """dots.llm1: Qwen3's attention (per-head q/k norm; layers from max_window_layers on slide when a window is
    set) on DeepSeek-V3's MoE (sigmoid router with choice bias, shared experts, leading dense layers)."""
    n = int(hf["num_hidden_layers"])
    window_from = int(hf.get("max_window_layers") if hf.get("max_window_layers") is not None else n)
    types = hf.get("layer_types") or ["sliding_attention" if hf.get("sliding_window") and L >= window_from
                                      else "full_attention" for L in range(n)]
    return ModelConfig(
        **base_fields(hf, family),
        attn_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head",
        **sliding_fields(hf, types),
        **{**v3_moe_fields(hf, first_dense(hf)), "norm_topk_prob": bool(hf.get("norm_topk_prob", False))},
    )



def per_layer_value(hf: dict[str, Any], key: str) -> int:
    """A HunYuan config value given once or once per layer (then all alike: d2moe's layers share one layout)."""
    v = hf[key]
    if isinstance(v, list):
        if len(set(v)) != 1:
            raise ConversionError(f"{key} differs between layers ({sorted(set(v))}); d2moe needs one value")
        v = v[0]
    return int(v)


def hunyuan_moe_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """Hunyuan-A13B (HunYuanMoEV1): softmax top-k renormalised, a shared MLP as wide as the experts in every
    layer (both `intermediate_size`), per-head q/k norms with weights applied after RoPE, and NTK-alpha RoPE
    (rope type "dynamic" with a fixed alpha: the base becomes theta * alpha^(D / (D - 2)), length independent)."""
    if hf.get("use_cla"):
        raise ConversionError("HunYuan with use_cla=true (cross-layer KV sharing) is not supported")
    params = rope_params(hf)
    if params.get("rope_type", params.get("type")) == "dynamic" and params.get("alpha"):
        D = int(hf_get(hf, "head_dim", default=int(hf["hidden_size"]) // int(hf["num_attention_heads"])))
        theta = rope_theta(hf) * float(params["alpha"]) ** (D / (D - 2))
        hf = {**hf, "rope_theta": theta, "rope_parameters": None, "rope_scaling": None}
    inter = int(hf["intermediate_size"])
    return ModelConfig(
        **base_fields(hf, family),
        attn_bias=bool(hf.get("attention_bias", False)),
        qk_norm="head_rope",  # transformers norms q and k whatever use_qk_norm says
        num_experts=per_layer_value(hf, "num_experts"),
        top_k=per_layer_value(hf, "moe_topk"),
        expert_intermediate=inter,
        norm_topk_prob=True,
        shared_expert_intermediate=inter,
    )


def minimax_m2_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """MiniMax-M2: Mixtral's layout with a sigmoid router and a choice-only bias (no groups, no shared expert),
    q/k RMSNorm over all heads (OLMoE's), RoPE on the leading `rotary_dim` dims of each head."""
    base = base_fields(hf, family)
    if 0 in (hf.get("attn_type_list") or []):
        raise ConversionError("MiniMax with linear-attention layers (attn_type_list 0) is not supported")
    D = base["head_dim"]
    partial = rope_params(hf).get("partial_rotary_factor") or hf.get("partial_rotary_factor")
    rotary = int(D * float(partial)) if partial else int(hf.get("rotary_dim") or D)
    return ModelConfig(
        **base,
        qk_norm="full",
        rotary_dim=rotary if rotary < D else 0,
        num_experts=int(hf_get(hf, "num_local_experts", "num_experts")),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["intermediate_size"]),
        norm_topk_prob=True,
        router_scoring="sigmoid",
        router_bias=True,
    )


def exaone_layer_types(hf: dict[str, Any]) -> list[str]:
    """EXAONE's attention per layer: `layer_types`, else `sliding_window_pattern` (every Nth layer global, or
    a string of L(ocal)/G(lobal) repeated, the last layer global); all global without a window."""
    n = int(hf["num_hidden_layers"])
    pattern = hf.get("sliding_window_pattern")
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    if not hf.get("sliding_window") or not pattern:
        return ["full_attention"] * n
    if isinstance(pattern, str):
        types = ["sliding_attention" if pattern[L % len(pattern)] == "L" else "full_attention" for L in range(n)]
        return types[:-1] + ["full_attention"]
    return ["sliding_attention" if (L + 1) % int(pattern) else "full_attention" for L in range(n)]


def exaone_moe_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """K-EXAONE (ExaoneMoe): per-head q/k norm before RoPE; with a sliding window, local layers slide and use
    RoPE while global layers attend everywhere without it (NoPE); DeepSeek-V3's router, shared experts and
    dense layers (mlp_layer_types, else the first first_k_dense_replace)."""
    types = exaone_layer_types(hf)
    window = bool(hf.get("sliding_window"))
    return ModelConfig(
        **base_fields(hf, family),
        qk_norm="head",
        **sliding_fields(hf, types),
        nope_layers=tuple(L for L, t in enumerate(types) if t != "sliding_attention") if window else (),
        **v3_moe_fields(hf, first_dense(hf)),
    )


def solar_open_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """Solar Open: GLM-4.5's MoE (V3 router, shared experts) in every layer under Llama's attention (RoPE on
    whole heads, no q/k norm)."""
    if float(rope_params(hf).get("partial_rotary_factor") or 1.0) != 1.0:
        raise ConversionError("Solar Open with partial_rotary_factor < 1 is not supported (transformers rotates "
                              "whole heads)")
    return ModelConfig(
        **base_fields(hf, family),
        attn_bias=bool(hf.get("attention_bias", False)),
        **v3_moe_fields(hf, ()),
    )

def ernie4_5_moe_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """ERNIE-4.5 MoE: softmax routing with a choice-only per-expert bias (moe_statics), shared experts,
    MoE layers on a grid between start and end index, interleaved-pair RoPE (rows halved at conversion)."""
    if hf.get("use_bias"):
        raise ConversionError("ERNIE-4.5 MoE with use_bias=true is not supported yet (FFN biases)")
    base = base_fields(hf, family)
    n = int(hf["num_hidden_layers"])
    start, end = int(hf.get("moe_layer_start_index", 1)), int(hf.get("moe_layer_end_index", -1))
    end = n - 1 if end == -1 else end
    step = int(hf.get("moe_layer_interval") or 1)
    dense = tuple(L for L in range(n) if not ((L + 1) % step == 0 and start <= L <= end))
    moe_i = int(hf["moe_intermediate_size"])
    return ModelConfig(
        **base,
        num_experts=int(hf_get(hf, "moe_num_experts", "num_experts")),
        top_k=int(hf_get(hf, "moe_k", "num_experts_per_tok")),
        expert_intermediate=moe_i,
        norm_topk_prob=True,
        router_bias=True,
        shared_expert_intermediate=moe_i * int(hf.get("moe_num_shared_experts") or 0),
        dense_layers=dense,
        dense_intermediate=int(hf["intermediate_size"]) if dense else 0,
    )


def ernie_fix(hf: dict[str, Any], model: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE rows of wq / wk to halves (`_rope_rows_halved_gqa`), the choice bias [1, E]
    to [E]."""
    if name.endswith("router_bias"):
        return t.reshape(-1)
    return rope_rows_halved(hf, model, name, t)


def gpt_oss_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """GPT-OSS: attention sinks, sliding and full attention layers alternating, biases everywhere (q/k/v/o,
    router, experts), clamped SwiGLU experts, YaRN RoPE."""
    base = base_fields(hf, family)
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or ["sliding_attention" if (L + 1) % 2 else "full_attention" for L in range(n)]
    window = int(hf.get("sliding_window") or 0)
    return ModelConfig(
        **base,
        attn_bias=bool(hf.get("attention_bias", True)),
        attention_sinks=True,
        sliding_window=window,
        sliding_layers=tuple(L for L, t in enumerate(types) if t == "sliding_attention") if window else (),
        num_experts=int(hf["num_local_experts"]),
        top_k=int(hf["num_experts_per_tok"]),
        expert_intermediate=int(hf["intermediate_size"]),
        norm_topk_prob=True,  # softmax over the top-k logits
        router_linear_bias=True,
        expert_act="clamped_swiglu",
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        expert_bias=True,
    )


def gpt_oss_names(model: ModelConfig, name: str) -> list[tuple[str, Part | None]] | None:
    """GPT-OSS stores a layer's experts stacked, gate and up interleaved (gate = even rows of the fused
    2I): as transformers saves them, x @ W ([E, H, 2I], [E, I, H]) in float, or as the released
    checkpoints, MXFP4 blocks of W ([E, 2I, H/32, 16] + scales). Its router is `mlp.router`, and each
    attention layer has one sink logit per head."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(mlp|self_attn)\.(\w+(?:\.\w+)?)", name)
    if not m:
        return None
    L, what = int(m.group(1)), m.group(3)
    if L >= model.num_layers:
        return []
    p = f"layers.{L}."
    E, I = model.num_experts, model.expert_intermediate
    fixed = {"router.weight": "router", "router.bias": "router_b", "sinks": "sinks",
             "experts.down_proj_bias": "expert_b2"}
    if what in fixed:
        return [(p + fixed[what], None)]
    if what == "experts.gate_up_proj_bias":  # [E, 2I]
        return [(p + "expert_b1", Part(cols=(0, 2 * I, 2))), (p + "expert_b3", Part(cols=(1, 2 * I, 2)))]
    if what in ("experts.gate_up_proj", "experts.gate_up_proj_blocks"):
        mx = what.endswith("_blocks")
        scales = name.replace("_blocks", "_scales") if mx else None
        return [(f"{p}experts.{e}.{w}", Part(e, rows=(r, 2 * I, 2), mxfp4_scales=scales) if mx
                 else Part(e, cols=(r, 2 * I, 2), transposed=True))
                for e in range(E) for w, r in (("w1", 0), ("w3", 1))]
    if what in ("experts.down_proj", "experts.down_proj_blocks"):
        mx = what.endswith("_blocks")
        return [(f"{p}experts.{e}.w2", Part(e, mxfp4_scales=name.replace("_blocks", "_scales")) if mx
                 else Part(e, transposed=True)) for e in range(E)]
    if what.endswith("_scales"):
        return []  # read with their blocks
    return None


def llama4_config(hf: dict[str, Any], family: str) -> ModelConfig:
    """Llama 4 (text): MoE and dense layers interleaved, a shared expert, top-k by sigmoid scores that scale
    each expert's input, RoPE layers (chunked attention, weightless q/k norm) and every 4th without RoPE
    (full attention, query temperature). A multimodal checkpoint's text model is read from text_config."""
    hf = {**hf.get("text_config", {}), "architectures": hf.get("architectures")} if "text_config" in hf else hf
    base = base_fields(hf, family)
    n = int(hf["num_hidden_layers"])
    step = int(hf.get("interleave_moe_layer_step") or 1)
    moe = hf.get("moe_layers")
    moe = set(moe if moe is not None else [L for L in range(n) if (L + 1) % step == 0])
    interval = int(hf.get("no_rope_layer_interval") or 4)
    rope = hf.get("no_rope_layers") or [int((L + 1) % interval != 0) for L in range(n)]  # 1: RoPE layer
    chunk = int(hf.get("attention_chunk_size") or 0)
    types = hf.get("layer_types") or ["chunked_attention" if rope[L] and chunk else "full_attention" for L in range(n)]
    dense = tuple(L for L in range(n) if L not in moe)
    return ModelConfig(
        **base,
        attn_bias=bool(hf.get("attention_bias", False)),
        qk_norm="l2" if hf.get("use_qk_norm", True) else "none",
        nope_layers=tuple(L for L in range(n) if not rope[L]),
        attention_chunk=chunk,
        chunked_layers=tuple(L for L, t in enumerate(types) if t == "chunked_attention") if chunk else (),
        temperature_floor=int(hf.get("floor_scale") or 8192) if hf.get("attn_temperature_tuning", True) else 0,
        temperature_scale=float(hf.get("attn_scale", 0.1)),
        num_experts=int(hf["num_local_experts"]),
        top_k=int(hf.get("num_experts_per_tok") or 1),
        expert_intermediate=int(hf["intermediate_size"]),
        norm_topk_prob=False,
        router_scoring="sigmoid",
        expert_input_weighted=True,
        shared_expert_intermediate=int(hf["intermediate_size"]),
        dense_layers=dense,
        dense_intermediate=int(hf.get("intermediate_size_mlp") or 0) if dense else 0,
    )


def llama4_names(model: ModelConfig, name: str) -> list[tuple[str, Part | None]] | None:
    """Llama 4 keeps a layer's experts stacked as x @ W: gate_up_proj [E, H, 2I] (gate columns first) and
    down_proj [E, I, H]. A multimodal checkpoint prefixes the text model with language_model."""
    name = name.removeprefix("language_model.")
    m = re.fullmatch(r"model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)", name)
    if not m:
        return None
    L, I = int(m.group(1)), model.expert_intermediate
    if L >= model.num_layers:
        return []
    p = f"layers.{L}.experts."
    if m.group(2) == "down_proj":
        return [(f"{p}{e}.w2", Part(e, transposed=True)) for e in range(model.num_experts)]
    return [(f"{p}{e}.{w}", Part(e, cols=cols, transposed=True)) for e in range(model.num_experts)
            for w, cols in (("w1", (0, I, 1)), ("w3", (I, 2 * I, 1)))]


def rope_rows_halved(hf: dict[str, Any], model: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair RoPE (ERNIE-4.5, Llama 4): each head's rows of wq / wk (and their biases) in
    evens-then-odds order, so d2moe's half rotation computes the same q . k."""
    if name.rsplit(".", 1)[-1] not in ("wq", "wk", "bq", "bk"):
        return t
    D = model.head_dim
    perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))
    return t.view(-1, D, *t.shape[1:])[:, perm].reshape(t.shape)
