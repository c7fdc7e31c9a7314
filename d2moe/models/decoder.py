"""One generic MoE decoder for every family; families differ only in ModelConfig and their name table."""

from __future__ import annotations

from collections.abc import Callable

import torch

from d2moe.config import ModelConfig
from d2moe.models.expert_provider import PREFETCH_MAX_TOKENS, ExpertProvider
from d2moe.models.layers import (
    KVCache,
    Linear,
    Rope,
    attention,
    block_input,
    block_output,
    embedding,
    linear,
    norm,
    swiglu,
)
from d2moe.models.mla import mla_attention
from d2moe.models.moe import (WidthRule, chosen_widths, guess_layer, moe_block, one_token_widths, predict_demands,
                             route_layer)
from d2moe.models.names import attention_names, top_names

# After a prefill, the first MoE layers' experts of the prompt's last token are read ahead for the first
# decode step (SliceMoE's predictive warm-up): by then the cache holds the prompt's last layers.
WARM_LAYERS = 4


class MoEDecoder:
    """Holds the dense (always resident) weights; experts come from `provider` on demand."""

    def __init__(
        self, cfg: ModelConfig, dense: dict[str, torch.Tensor], provider: ExpertProvider, prefetch: bool = False,
        widths: WidthRule | None = None,
    ) -> None:
        self.cfg = cfg
        self.w = dense
        self.provider = provider
        self.prefetch = prefetch  # the next MoE layer's router on this layer's residual stream (HOBBIT, AdapMoE)
        self.widths = widths  # per-(token, expert) width rule (models/widths.py); None: the token's width
        self.width_hist = torch.zeros(16, dtype=torch.int64)  # (token, chosen expert) pairs run at each width
        self.tap: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # calibration's probe
        moe = cfg.moe_layers
        self.next_moe = {a: b for a, b in zip(moe, moe[1:])}  # layer -> the MoE layer after it
        self.rope = Rope(cfg.rope_dim, cfg.rope_theta, cfg.max_position, cfg.rope_scaling)
        self.attention = mla_attention if cfg.attention == "mla" else attention
        self.lm_head = dense["embed"] if cfg.tie_word_embeddings else dense["lm_head"]
        self._check_weights()
        if cfg.absent_expert_bias:  # fp32 once, not per layer per step
            for L in cfg.moe_layers:
                absent = dense[f"layers.{L}.absent_bias"].float()
                dense[f"layers.{L}.absent_bias"], dense[f"layers.{L}.absent_total"] = absent, absent.sum(0)

    def _check_weights(self) -> None:
        missing = [n for n in top_names(self.cfg) if n not in self.w]
        for L in range(self.cfg.num_layers):
            p = f"layers.{L}."
            need = list(attention_names(self.cfg))
            need += ["ffn.w1", "ffn.w3", "ffn.w2"] if L in self.cfg.dense_layers else ["router"]
            missing += [p + n for n in need if p + n not in self.w]
        if missing:
            raise ValueError(f"dense weights are missing {len(missing)} tensors, e.g. {missing[:3]}")

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        max_len = min(max_len, self.cfg.max_position)
        return KVCache(self.cfg, batch, max_len)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, cache: KVCache, bits: int | torch.Tensor, *, last_only: bool = False,
        price: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B,T] -> logits [B,T,V] (or [B,1,V] with last_only). `bits` per token [B,T] or one int:
        the width, or with a router-two `price` (per token, NaN: fixed width) the widest it may pick."""
        return self.run(tokens, cache, bits, last_only=last_only, price=price)

    def run(
        self, tokens: torch.Tensor, cache: KVCache, bits: int | torch.Tensor, *, last_only: bool = False,
        price: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`forward` without inference mode: calibration differentiates through it (with `tap`)."""
        cfg, w = self.cfg, self.w
        B, T = tokens.shape
        token_bits = bits if isinstance(bits, torch.Tensor) else torch.full((B, T), int(bits))
        flat_price = None if price is None else (
            price if isinstance(price, torch.Tensor) else torch.full((B, T), float(price))).reshape(-1)
        h = self.embed(tokens)
        warm = []  # prefill: (layer, the last token's demands), to warm the cache for the decode that follows
        for L in range(cfg.num_layers):
            p = f"layers.{L}."
            a = self.attention(block_input(h, w, p + "attn_norm", cfg), w, p, cfg, self.rope, cache, L)
            h = h + block_output(a, w, p + "attn_norm", cfg)
            x = block_input(h, w, p + "ffn_norm", cfg)
            if L in cfg.dense_layers:
                y = swiglu(x, w[p + "ffn.w1"], w[p + "ffn.w3"], w[p + "ffn.w2"])
                h = h + block_output(y, w, p + "ffn_norm", cfg)
            else:
                flat_bits = token_bits.reshape(-1)
                nxt = self.next_moe.get(L)
                if (self.prefetch and nxt is not None and B * T <= PREFETCH_MAX_TOKENS
                        and self.provider.wants_prefetch(nxt, int(flat_bits.max()))):
                    # the next MoE layer's guess (its fitted one, or its router) on this layer's residual stream
                    q = f"layers.{nxt}."
                    guess_x = block_input(h, w, q + "ffn_norm", cfg).reshape(B * T, -1)
                    guess = guess_layer(guess_x, w, q, cfg)
                    if B * T == 1:  # decode: lists, the rule's fast path
                        idx, weight = guess.idx[0].tolist(), guess.weight[0].tolist()
                        bits_k = one_token_widths(nxt, guess_x, guess, idx, weight, flat_bits, flat_price, self.widths)
                        demands = [(e, b, 1) for e, b in zip(idx, bits_k) if b > 0]
                    else:
                        demands = predict_demands(guess, chosen_widths(nxt, guess_x, guess, flat_bits, flat_price,
                                                                       self.widths))
                    self.provider.prefetch(nxt, demands)
                if self.prefetch and B * T > PREFETCH_MAX_TOKENS and len(warm) < WARM_LAYERS:
                    last = x[:, -1].reshape(B, -1)  # [B, H]: each sequence's last token
                    r = route_layer(last, w, p, cfg)
                    lb = token_bits[:, -1]
                    lp = None if flat_price is None else flat_price.view(B, T)[:, -1]
                    warm.append((L, predict_demands(r, chosen_widths(L, last, r, lb, lp, self.widths))))
                y = moe_block(x.reshape(B * T, -1), w, p, L, cfg, self.provider, flat_bits, widths=self.widths,
                              price=flat_price, width_hist=self.width_hist)
                if self.tap is not None:
                    y = self.tap(L, x.reshape(B * T, -1), y)
                h = h + block_output(y.view(B, T, -1), w, p + "ffn_norm", cfg)
        if warm:
            self.provider.warm(warm)
        cache.length += T
        if last_only:
            h = h[:, -1:]
        return self.head(h)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] -> the residual stream [..., H], fp32 whatever the storage (scaled: Granite)."""
        h = embedding(tokens, self.w["embed"])
        return h if self.cfg.embedding_multiplier == 1.0 else h * self.cfg.embedding_multiplier

    def head(self, h: torch.Tensor, lin: Linear = linear) -> torch.Tensor:
        """The residual stream [..., H] -> logits [..., V]: final norm, lm_head (+ bias), logit scale. `lin`
        computes the matrix (a batched step's row-invariant calls)."""
        cfg = self.cfg
        logits = lin(norm(h, self.w, "norm", cfg), self.lm_head, self.w.get("lm_head_b"))
        return logits if cfg.logit_scale == 1.0 else logits * cfg.logit_scale
