"""The MoE block: router -> per-token widths -> demand set -> experts from the provider -> combine.

Pipeline for T tokens of one layer:
  [Router]  scores [T,E] -> top-k experts idx [T,k] and combine weights [T,k]
  [Widths]  bits [T,k] per chosen expert (the request's choice today; router two later)
  [Demand]  unique (expert, bits) pairs; the provider yields them as they become ready
  [Combine] out[t] = sum_k weight[t,k] * expert(x[t]) (+ shared expert, + absent-expert vectors)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from d2moe.config import ModelConfig
from d2moe.models.expert_provider import ExpertProvider, weighted_sum
from d2moe.models.layers import linear, swiglu


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


def _many_tokens(
    xf: torch.Tensor, routing: Routing, token_bits: torch.Tensor, layer: int, cfg: ModelConfig,
    provider: ExpertProvider,
) -> torch.Tensor:
    """Group the T*k (token, expert, bits) triples by (expert, bits); each expert runs once on its tokens."""
    bits = token_bits.view(-1, 1).expand_as(routing.idx)  # [T, k]
    flat_expert = routing.idx.reshape(-1)
    flat_bits = bits.reshape(-1)
    flat_weight = routing.weight.reshape(-1)
    flat_token = torch.arange(xf.shape[0]).repeat_interleave(cfg.top_k)
    keys = flat_expert * 16 + flat_bits  # one key per (expert, bits) pair
    unique_keys = torch.unique(keys).tolist()
    demands = [(k // 16, k % 16) for k in unique_keys]

    out = torch.zeros_like(xf)
    for expert, b, fn in provider.experts(layer, demands):
        sel = (keys == expert * 16 + b).nonzero().squeeze(1)
        tokens = flat_token[sel]
        y = fn(xf[tokens])
        out.index_add_(0, tokens, y * flat_weight[sel, None])
    return out


def _one_token(xf: torch.Tensor, routing: Routing, bits: int, layer: int, provider: ExpertProvider) -> torch.Tensor:
    """Decode step: k distinct experts at one width, no grouping; run together once all are ready."""
    weight = routing.weight[0].tolist()
    slot = {e: i for i, e in enumerate(routing.idx[0].tolist())}
    ready = list(provider.experts(layer, [(e, bits) for e in slot]))
    return weighted_sum([fn for _, _, fn in ready], [weight[slot[e]] for e, _, _ in ready], xf)


def moe_block(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    prefix: str,
    layer: int,
    cfg: ModelConfig,
    provider: ExpertProvider,
    token_bits: torch.Tensor,
) -> torch.Tensor:
    """x [T,H] (normed hidden), token_bits [T] width per token -> [T,H]."""
    routing = route(x, w[prefix + "router"], cfg)
    if x.shape[0] == 1:
        out = _one_token(x.float(), routing, int(token_bits[0]), layer, provider)
    else:
        out = _many_tokens(x.float(), routing, token_bits, layer, cfg, provider)
    if cfg.shared_expert_intermediate:
        shared = swiglu(x, w[prefix + "shared.w1"], w[prefix + "shared.w3"], w[prefix + "shared.w2"])
        if cfg.shared_expert_gate:
            shared = torch.sigmoid(linear(x, w[prefix + "shared_gate"])) * shared
        out = out + shared
    if cfg.absent_expert_bias:
        absent = w[prefix + "absent_bias"].float()  # [E, H]
        out = out + absent.sum(0) - absent[routing.idx].sum(1)
    return out.to(x.dtype)
