"""The MoE block: router -> per-token widths -> demand set -> experts from the provider -> combine.

Pipeline for T tokens of one layer:
  [Router]  scores [T,E] -> top-k experts idx [T,k] and combine weights [T,k]
  [Widths]  bits [T,k] per chosen expert (the request's width, or a rule: models/widths.py; 0 = skip)
  [Demand]  unique (expert, bits) pairs; the provider yields them as they become ready
  [Combine] out[t] = sum_k weight[t,k] * expert(x[t]) (+ shared expert, + absent-expert vectors)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from d2moe.config import ModelConfig
from d2moe.models.expert_provider import ExpertProvider, weighted_sum
from d2moe.models.layers import linear, swiglu
from d2moe.models.widths import request_widths


@dataclass(frozen=True)
class Routing:
    idx: torch.Tensor  # [T, k] chosen experts
    weight: torch.Tensor  # [T, k] combine weights (fp32)


def route(x: torch.Tensor, router: torch.Tensor, cfg: ModelConfig) -> Routing:
    """Router one: pick each token's top-k experts. x [T,H] -> Routing."""
    logits = linear(x, router)  # [T, E] fp32
    if cfg.router_scoring == "softmax":
        probs = logits.softmax(dim=-1)
        weight, idx = probs.topk(cfg.top_k, dim=-1)
        if cfg.norm_topk_prob:
            weight = weight / weight.sum(dim=-1, keepdim=True)
    else:  # "linear": top-k of raw scores, chosen experts are summed unscaled
        idx = logits.topk(cfg.top_k, dim=-1).indices
        weight = torch.ones_like(idx, dtype=torch.float32)
    return Routing(idx, weight)


# (layer, x [T,H], routing, token bits [T], token price [T] or None) -> widths [T,k] (0: skip); see widths.py
WidthRule = Callable[[int, torch.Tensor, Routing, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _many_tokens(
    xf: torch.Tensor, routing: Routing, bits: torch.Tensor, layer: int, cfg: ModelConfig, provider: ExpertProvider,
) -> torch.Tensor:
    """Group the T*k (token, expert, bits) triples by (expert, bits); each expert runs once on its tokens.
    bits [T,k] per chosen expert (0: skipped)."""
    flat_expert = routing.idx.reshape(-1)
    flat_bits = bits.reshape(-1)
    flat_weight = routing.weight.reshape(-1)
    flat_token = torch.arange(xf.shape[0]).repeat_interleave(cfg.top_k)
    keys = flat_expert * 16 + flat_bits  # one key per (expert, bits) pair
    unique_keys, counts = torch.unique(keys[flat_bits > 0], return_counts=True)
    demands = [(k // 16, k % 16, n) for k, n in zip(unique_keys.tolist(), counts.tolist())]

    # Experts are computed as they become ready (overlapping the loads still running); their outputs are
    # summed afterwards in (expert, bits) order, so the result does not depend on arrival order.
    parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for batch in provider.experts(layer, demands):
        for expert, b, fn in batch:
            key = expert * 16 + b
            sel = (keys == key).nonzero().squeeze(1)
            tokens = flat_token[sel]
            parts.append((key, tokens, fn(xf[tokens]) * flat_weight[sel, None]))
    out = torch.zeros_like(xf)
    for _, tokens, y in sorted(parts, key=lambda p: p[0]):
        out.index_add_(0, tokens, y)
    return out


def _one_token(xf: torch.Tensor, routing: Routing, bits: list[int], layer: int, provider: ExpertProvider) -> torch.Tensor:
    """Decode step: k distinct experts, no grouping. One token's experts cost a fraction of a millisecond
    against milliseconds per read, so they run together in one kernel call once all are ready, in routing
    order: every policy and arrival order gives bit-identical results. bits [k] (0: skipped)."""
    weight = routing.weight[0].tolist()
    chosen = [(e, b, w) for e, b, w in zip(routing.idx[0].tolist(), bits, weight) if b > 0]
    fns: dict[int, object] = {}
    for batch in provider.experts(layer, [(e, b, 1) for e, b, _ in chosen], hold=True):
        fns.update((e, fn) for e, _, fn in batch)
    if not chosen:
        return torch.zeros_like(xf)
    return weighted_sum([fns[e] for e, _, _ in chosen], [w for _, _, w in chosen], xf)


def predict_demands(routing: Routing, bits: torch.Tensor) -> list:
    """Cross-layer prediction (HOBBIT, AdapMoE): `routing` is the next MoE layer's router applied to this
    layer's input, `bits` [T,k] the widths its rule gives them (0: skipped); returns (expert, bits, tokens)
    demands to prefetch, surest first (most tokens, then best router rank): the provider reads only the
    bases of the ranks that often guess wrong."""
    best: dict[int, tuple[int, int, int]] = {}  # expert -> (tokens, best rank, widest bits)
    for rank, (e, b) in enumerate(zip(routing.idx.T.reshape(-1).tolist(), bits.T.reshape(-1).tolist())):
        if b <= 0:
            continue
        n, r, w = best.get(e, (0, rank, 0))
        best[e] = (n + 1, min(r, rank), max(w, b))
    order = sorted(best, key=lambda e: (-best[e][0], best[e][1]))
    return [(e, best[e][2], best[e][0]) for e in order]


def chosen_widths(layer: int, x: torch.Tensor, routing: Routing, token_bits: torch.Tensor,
                  price: torch.Tensor | None, widths: WidthRule | None) -> torch.Tensor:
    """[T,k] width of every chosen expert: the rule's, or every expert at its token's width."""
    return request_widths(routing.idx, token_bits) if widths is None else widths(layer, x, routing, token_bits, price)


def moe_block(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    prefix: str,
    layer: int,
    cfg: ModelConfig,
    provider: ExpertProvider,
    token_bits: torch.Tensor,
    routing: Routing | None = None,
    widths: WidthRule | None = None,
    price: torch.Tensor | None = None,
    width_hist: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [T,H] (normed hidden), token_bits [T] width per token -> [T,H]. `widths` picks each chosen
    expert's width (models/widths.py), given each token's router-two price (NaN or None: its fixed width);
    by default every chosen expert runs at its token's width."""
    routing = routing if routing is not None else route(x, w[prefix + "router"], cfg)
    if x.shape[0] == 1:
        bits = ([int(token_bits[0])] * cfg.top_k if widths is None
                else widths(layer, x, routing, token_bits, price)[0].tolist())
        if width_hist is not None:
            for b in bits:
                width_hist[b] += 1
        out = _one_token(x.float(), routing, bits, layer, provider)
    else:
        bits_tk = chosen_widths(layer, x, routing, token_bits, price, widths)
        if width_hist is not None:
            width_hist += torch.bincount(bits_tk.reshape(-1), minlength=width_hist.numel())
        out = _many_tokens(x.float(), routing, bits_tk, layer, cfg, provider)
    if cfg.shared_expert_intermediate:
        shared = swiglu(x, w[prefix + "shared.w1"], w[prefix + "shared.w3"], w[prefix + "shared.w2"])
        if cfg.shared_expert_gate:
            shared = torch.sigmoid(linear(x, w[prefix + "shared_gate"])) * shared
        out = out + shared
    if cfg.absent_expert_bias:
        absent = w[prefix + "absent_bias"].float()  # [E, H]
        out = out + absent.sum(0) - absent[routing.idx].sum(1)
    return out.to(x.dtype)
