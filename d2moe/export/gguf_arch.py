"""Which llama.cpp architecture computes a store's model, and where each canonical tensor goes in it.

llama.cpp builds each architecture's graph in C++ with its own fixed choices, so a store maps onto one only
when its model makes the same ones: Mixtral onto "llama" (softmax router, top-k weights renormalised,
interleaved-pair RoPE, hence q/k rows permuted as llama.cpp's converter does), Qwen2-MoE onto "qwen2moe"
(weights not renormalised, a shared expert behind a sigmoid gate, q/k/v biases) and Qwen3-MoE onto
"qwen3moe" (renormalised, per-head q/k RMSNorm), OLMoE onto "olmoe" (not renormalised, q/k RMSNorm over
all heads). Anything else is refused with the reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import gguf

from d2moe.config import ModelConfig
from d2moe.convert.families import ConversionError

T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class Arch:
    name: str  # llama.cpp's architecture name
    family: str  # the d2moe family it holds
    title: str
    norm_topk_prob: bool
    qk_norm: str
    shared_expert: bool
    permute_qk: bool  # llama.cpp's "llama" rotates interleaved pairs: q/k rows reordered per head
    output_required: bool  # the loader needs output.weight even when tied

    @property
    def enum(self) -> gguf.MODEL_ARCH:
        return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.name)


ARCHS = (
    Arch("llama", "mixtral", "Mixtral", True, "none", False, True, False),
    Arch("qwen2moe", "qwen2_moe", "Qwen2-MoE", False, "none", True, False, True),
    Arch("qwen3moe", "qwen3_moe", "Qwen3-MoE", True, "head", False, False, False),
    Arch("olmoe", "olmoe", "OLMoE", False, "full", False, False, True),
)
SUPPORTED = ", ".join(f"{a.title} (llama.cpp arch {a.name})" for a in ARCHS)

# ModelConfig fields whose non-default values no supported llama.cpp graph computes
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
_PLAIN = ("rope_scaling", "attention", "rotary_dim", "softmax_scale", "attention_sinks", "sliding_window",
          "attention_chunk", "nope_layers", "temperature_floor", "norm", "embedding_multiplier",
          "residual_multiplier", "logit_scale", "lm_head_bias", "router_scoring", "router_bias", "expert_groups",
          "routed_scaling_factor", "expert_input_weighted", "router_linear_bias", "expert_act", "expert_bias",
          "dense_layers", "absent_expert_bias")


def arch_for(model: ModelConfig) -> Arch:
    """The llama.cpp architecture for `model`, or ConversionError naming what none of them computes."""
    arch = next((a for a in ARCHS if a.family == model.family), None)
    if arch is None:
        raise ConversionError(f"gguf export supports {SUPPORTED}; this store is {model.family} "
                              "(export it as safetensors instead)")
    odd = [f for f in _PLAIN if getattr(model, f) != _DEFAULTS[f] and not (
        f == "softmax_scale" and model.softmax_scale == model.head_dim**-0.5)]
    if model.norm_topk_prob != arch.norm_topk_prob:
        odd.append(f"norm_topk_prob={model.norm_topk_prob}")
    if model.qk_norm != arch.qk_norm:
        odd.append(f"qk_norm={model.qk_norm}")
    if bool(model.shared_expert_intermediate) != arch.shared_expert or (
            arch.shared_expert and not model.shared_expert_gate):
        odd.append("a shared expert" if not arch.shared_expert else "no gated shared expert")
    if model.attn_bias and arch.permute_qk:
        odd.append("attention biases")
    if arch.qk_norm == "full" and model.num_kv_heads != model.num_heads:
        odd.append("grouped-query attention: its k norm spans all heads")
    if odd:
        raise ConversionError(f"llama.cpp's {arch.name} graph does not compute this {model.family} model "
                              f"({', '.join(odd)}); export it as safetensors instead")
    return arch


def _name(t: gguf.MODEL_TENSOR, layer: int | None = None, kind: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[t]
    return (base.format(bid=layer) if layer is not None else base) + "." + kind


@dataclass(frozen=True)
class Entry:
    """One GGUF tensor: its name and the canonical tensor(s) it is made of (experts: one per expert,
    stacked), with llama.cpp's q/k row permutation for `permute_heads` heads when set."""

    name: str
    tensor: gguf.MODEL_TENSOR
    sources: tuple[str, ...]
    stacked: bool = False
    permute_heads: int = 0
    flatten: bool = False  # [1, H] -> [H] (the shared expert gate)


def tensor_entries(model: ModelConfig, arch: Arch, names: set[str]) -> list[Entry]:
    """Every GGUF tensor of the model, in llama.cpp's order; checks each is one the architecture has and
    that every canonical tensor of the store found a place."""
    out: list[Entry] = [Entry(_name(T.TOKEN_EMBD), T.TOKEN_EMBD, ("embed",))]
    for L in range(model.num_layers):
        p = f"layers.{L}."
        attn = [(T.ATTN_NORM, "attn_norm", 0), (T.ATTN_Q, "wq", model.num_heads), (T.ATTN_K, "wk", model.num_kv_heads),
                (T.ATTN_V, "wv", 0), (T.ATTN_OUT, "wo", 0), (T.ATTN_Q_NORM, "q_norm", 0),
                (T.ATTN_K_NORM, "k_norm", 0), (T.FFN_NORM, "ffn_norm", 0), (T.FFN_GATE_INP, "router", 0)]
        for t, canon, heads in attn:
            if p + canon in names:
                out.append(Entry(_name(t, L), t, (p + canon,), permute_heads=heads if arch.permute_qk else 0))
        for t, canon in ((T.ATTN_Q, "bq"), (T.ATTN_K, "bk"), (T.ATTN_V, "bv")):
            if p + canon in names:
                out.append(Entry(_name(t, L, "bias"), t, (p + canon,)))
        for t, w in ((T.FFN_GATE_EXP, "w1"), (T.FFN_DOWN_EXP, "w2"), (T.FFN_UP_EXP, "w3")):
            experts = tuple(f"{p}experts.{e}.{w}" for e in range(model.num_experts))
            out.append(Entry(_name(t, L), t, experts, stacked=True))
        if p + "shared_gate" in names:
            out.append(Entry(_name(T.FFN_GATE_INP_SHEXP, L), T.FFN_GATE_INP_SHEXP, (p + "shared_gate",), flatten=True))
        for t, w in ((T.FFN_GATE_SHEXP, "w1"), (T.FFN_DOWN_SHEXP, "w2"), (T.FFN_UP_SHEXP, "w3")):
            if p + "shared." + w in names:
                out.append(Entry(_name(t, L), t, (p + "shared." + w,)))
    out.append(Entry(_name(T.OUTPUT_NORM), T.OUTPUT_NORM, ("norm",)))
    if "lm_head" in names or arch.output_required:
        out.append(Entry(_name(T.OUTPUT), T.OUTPUT, ("lm_head",) if "lm_head" in names else ("embed",)))
    allowed = set(gguf.MODEL_TENSORS[arch.enum])
    if bad := [e.name for e in out if e.tensor not in allowed]:
        raise ConversionError(f"llama.cpp's {arch.name} has no tensor {bad[0]}")
    used = {s for e in out for s in e.sources}
    if missing := sorted(names - used):
        raise ConversionError(f"no {arch.name} GGUF tensor holds {len(missing)} of this store's tensors, "
                              f"e.g. {', '.join(missing[:3])}")
    return out

