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
from d2moe.models.expert_provider import ExpertProvider
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
    bits = token_bits.view(-1, 1).expand_as(routing.idx)  # [T, k]
    flat_expert = routing.idx.reshape(-1)
    flat_bits = bits.reshape(-1)
    flat_weight = routing.weight.reshape(-1)
    flat_token = torch.arange(x.shape[0]).repeat_interleave(cfg.top_k)
    keys = flat_expert * 16 + flat_bits  # one key per (expert, bits) pair
    unique_keys = torch.unique(keys).tolist()
    demands = [(k // 16, k % 16) for k in unique_keys]

    xf = x.float()
    out = torch.zeros_like(xf)
    for expert, b, fn in provider.experts(layer, demands):
        sel = (keys == expert * 16 + b).nonzero().squeeze(1)
        tokens = flat_token[sel]
        y = fn(xf[tokens])
        out.index_add_(0, tokens, y * flat_weight[sel, None])

    if cfg.shared_expert_intermediate:
        shared = swiglu(x, w[prefix + "shared.w1"], w[prefix + "shared.w3"], w[prefix + "shared.w2"])
        if cfg.shared_expert_gate:
            shared = torch.sigmoid(linear(x, w[prefix + "shared_gate"])) * shared
        out = out + shared
    if cfg.absent_expert_bias:
        absent = w[prefix + "absent_bias"].float()  # [E, H]
        out = out + absent.sum(0) - absent[routing.idx].sum(1)
    return out.to(x.dtype)
