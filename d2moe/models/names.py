"""Canonical tensor names: every family's HF names map onto these (see convert/hf_names.py).

Shapes (H hidden, I expert intermediate, E experts, V vocab, D head dim):
  embed [V,H]  lm_head [V,H] (absent when tied)  norm [H]
  layers.L.attn_norm [H]  layers.L.ffn_norm [H]
  layers.L.wq [nH*D,H]  wk/wv [nKV*D,H]  wo [H,nH*D]  (bq/bk/bv when attn_bias)
  layers.L.q_norm / k_norm: [D] (qk_norm=head) or [nH*D]/[nKV*D] (qk_norm=full)
  dense FFN layer: layers.L.ffn.w1 / w3 [Idense,H], w2 [H,Idense]
  MoE layer: layers.L.router [E,H]; layers.L.experts.e.w1 / w3 [I,H], w2 [H,I] (stored in experts.bin)
             layers.L.shared.w1/w3/w2 (shared expert), layers.L.shared_gate [1,H]
             layers.L.absent_bias [E,H] (vector added for each expert a token did not choose)
w1 is the SwiGLU gate projection, w3 the up projection, w2 the down projection.
"""

from __future__ import annotations

EXPERT_MATRICES: tuple[str, ...] = ("w1", "w3", "w2")


def expert_name(layer: int, expert: int, matrix: str) -> str:
    return f"layers.{layer}.experts.{expert}.{matrix}"


def is_expert_name(name: str) -> bool:
    return ".experts." in name
