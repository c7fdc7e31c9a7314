"""Canonical tensor names: every family's HF names map onto these (see convert/hf_names.py).

Shapes (H hidden, I expert intermediate, E experts, V vocab, D head dim):
  embed [V,H]  lm_head [V,H] (absent when tied)  norm [H]
  layers.L.attn_norm [H]  layers.L.ffn_norm [H]
  layers.L.wq [nH*D,H]  wk/wv [nKV*D,H]  wo [H,nH*D]  (bq/bk/bv when attn_bias)
  layers.L.q_norm / k_norm: [D] (qk_norm=head or head_rope) or [nH*D]/[nKV*D] (qk_norm=full)
  MLA (attention=mla, D = dn + dr, r = kv_lora_rank, rq = q_lora_rank; see models/mla.py):
    layers.L.wq [nH*D,H], or wq_a [rq,H] + q_a_norm [rq] + wq_b [nH*D,rq]
    layers.L.wkv_a [r+dr,H]  kv_a_norm [r]  wkv_b [nH*(dn+dv),r]  wo [H,nH*dv]
  biases: b + the matrix name without its w (bq, bq_a, bkv_a, bo); LayerNorm biases: <norm>_b (norm=layer)
  layers.L.sinks [nH] (attention sinks, GPT-OSS)
  dense FFN layer: layers.L.ffn.w1 / w3 [Idense,H], w2 [H,Idense]
  MoE layer: layers.L.router [E,H]; layers.L.experts.e.w1 / w3 [I,H], w2 [H,I] (stored in experts.bin)
             layers.L.router_bias [E] (choice-only score bias, DeepSeek-V3), router_b [E] (router's own, GPT-OSS)
             layers.L.expert_b1 / expert_b3 [E,I], expert_b2 [E,H] (expert biases, resident; GPT-OSS)
             layers.L.shared.w1/w3/w2 (shared expert), layers.L.shared_gate [1,H]
             layers.L.absent_bias [E,H] (vector added for each expert a token did not choose)
w1 is the SwiGLU gate projection, w3 the up projection, w2 the down projection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from d2moe.config import ModelConfig

EXPERT_MATRICES: tuple[str, ...] = ("w1", "w3", "w2")


def expert_name(layer: int, expert: int, matrix: str) -> str:
    return f"layers.{layer}.experts.{expert}.{matrix}"


def is_expert_name(name: str) -> bool:
    return ".experts." in name


def attention_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The tensors (after `layers.L.`) a layer's attention and its two norms need."""
    norms = ("attn_norm", "ffn_norm") + (("attn_norm_b", "ffn_norm_b") if cfg.norm == "layer" else ())
    if cfg.attention == "mla":
        q = ("wq_a", "q_a_norm", "wq_b") if cfg.q_lora_rank else ("wq",)
        return norms + q + ("wkv_a", "kv_a_norm", "wkv_b", "wo")
    return norms + ("wq", "wk", "wv", "wo") + (("sinks",) if cfg.attention_sinks else ())


def top_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The tensors outside the layers."""
    head = () if cfg.tie_word_embeddings else ("lm_head",)
    return ("embed", "norm") + (("norm_b",) if cfg.norm == "layer" else ()) + head + (
        ("lm_head_b",) if cfg.lm_head_bias else ())
