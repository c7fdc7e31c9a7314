"""One memory budget a user understands: what the model holds, split and checked at start.

    budget = dense weights + KV cache + scratch + expert cache

Dense weights are measured (bytes of the loaded tensors); the KV cache is reserved for `context` tokens;
scratch is an upper estimate of a step's activations (the peak-RSS benchmark checks it); the expert cache
(the arena) gets the rest. The smallest budget that runs holds, besides the rest, the base slices of one
layer's chosen experts (top-k at 2 bits): below it is a clear error naming that minimum. The process's
fixed cost (interpreter, torch, tokenizer) comes on top and is reported apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from d2moe.config import EngineConfig, ModelConfig
from d2moe.cache.expert_cache import BudgetError
from d2moe.models.kv_window import cache_len, has_windows
from d2moe.models.layers import kv_cache_dims
from d2moe.quant.kernels.cpu import DECODE_BLOCK, SMALL_T
from d2moe.quant.pack import ExpertLayout
from d2moe.util.sizes import format_size

F32 = 4


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1) -> int:
    """fp32 keys and values of every layer for `context` positions (MLA: its latent, layers.kv_cache_dims;
    a sliding or chunked layer at most its span, models/kv_window.py)."""
    heads, k_dim, v_dim = kv_cache_dims(cfg)
    positions = sum(cache_len(cfg, L, context) for L in range(cfg.num_layers))
    return batch * heads * positions * (k_dim + v_dim) * F32


def prefix_cache_bytes(cfg: ModelConfig, positions: int) -> int:
    """The prefix cache's keys and values (engine/prefix_cache.py); models with sliding-window rings keep none."""
    if not positions or has_windows(cfg):
        return 0
    return kv_cache_bytes(cfg, positions)


def scratch_bytes(cfg: ModelConfig, step_tokens: int, context: int, full_logits: bool) -> int:
    """Upper estimate of one step's live activations (fp32): residual stream and attention, attention
    scores when materialised, the MoE block's per-expert activations, the logits, and for long steps two
    blocks of expert rows decoded to float for a GEMM (gate and up)."""
    T, H = step_tokens, cfg.hidden_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    if cfg.attention == "mla":  # q, its latent-absorbed copy and the per-head outputs
        qkv = cfg.num_heads * (cfg.head_dim + 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.value_dim)
    hidden = T * (6 * H + 2 * qkv) * F32
    scores = T * context * cfg.num_heads * F32 if T > 1 else 0
    # routed: per (token, expert) its gathered input and weighted output (moe.grouped_experts) and the gate
    # and up activations; the block's input and output
    ffn = max(cfg.top_k * 2 * (cfg.expert_intermediate + H) + 2 * H, 3 * cfg.dense_intermediate,
              3 * cfg.shared_expert_intermediate)
    moe = T * ffn * F32
    inter = max(cfg.expert_intermediate, cfg.dense_intermediate)
    logits = (T if full_logits else 1) * cfg.vocab_size * F32 * 2  # logits + log-softmax
    decoded = 2 * min(H * inter, DECODE_BLOCK + max(H, inter)) * F32 if T > SMALL_T else 0
    return hidden + scores + moe + logits + decoded


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    dense: int
    kv_cache: int
    prefix_cache: int
    scratch: int
    experts: int  # the expert cache arena
    minimum: int  # the smallest budget that runs this configuration

    def describe(self) -> str:
        parts = ", ".join(
            f"{k.replace('_', ' ')} {format_size(v)}" for k, v in asdict(self).items() if k not in ("budget", "minimum")
        )
        return f"memory budget {format_size(self.budget)}: {parts} (minimum {format_size(self.minimum)})"


def plan_memory(cfg: ModelConfig, engine: EngineConfig, dense_bytes: int, layout: ExpertLayout,
                all_experts_bytes: int) -> MemoryPlan:
    """Split the budget, or raise BudgetError naming the minimum."""
    kv = kv_cache_bytes(cfg, engine.context, engine.kv_slots)
    prefix = prefix_cache_bytes(cfg, engine.prefix_cache)
    scratch = scratch_bytes(cfg, engine.step_tokens, engine.context, engine.full_logits)
    fixed = dense_bytes + kv + prefix + scratch
    one_layer = cfg.top_k * layout.slice_bytes(2)
    minimum = fixed + one_layer
    budget = engine.memory_budget if engine.memory_budget is not None else fixed + all_experts_bytes
    if budget < minimum:
        slots = "" if engine.kv_slots == 1 else f"{engine.kv_slots} x "
        prefix_part = f" + prefix cache {format_size(prefix)}" if prefix else ""
        raise BudgetError(
            f"memory budget {format_size(budget)} is below the minimum {format_size(minimum)} for this model "
            f"and context: dense weights {format_size(dense_bytes)} + KV cache {format_size(kv)} "
            f"({slots}{engine.context} tokens){prefix_part} + scratch {format_size(scratch)} + one layer's "
            f"{cfg.top_k} experts at 2 bits {format_size(one_layer)}"
        )
    return MemoryPlan(budget, dense_bytes, kv, prefix, scratch, budget - fixed, minimum)
