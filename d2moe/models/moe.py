"""The MoE block: router -> per-token widths -> demand set -> experts from the provider -> combine.

Pipeline for T tokens of one layer:
  [Router]  scores [T,E] -> top-k experts idx [T,k] and combine weights [T,k]
  [Widths]  bits [T,k] per chosen expert (the request's width, or a rule: models/widths.py; 0 = skip)
  [Demand]  unique (expert, bits) pairs; the provider yields them as they become ready
  [Combine] out[t] = sum_k weight[t,k] * expert(x[t]) (+ shared expert, + absent-expert vectors)
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.config import ModelConfig
from d2moe.models.expert_provider import ExpertFn, ExpertProvider, weighted_sum
from d2moe.models.dense_f16 import contiguous_f32
from d2moe.models.layers import Linear, clamped_swiglu, linear, swiglu
from d2moe.models.widths import request_widths
from d2moe.quant.kernels.cpu import load_kernel


@dataclass(frozen=True)
class Routing:
    idx: torch.Tensor  # [T, k] chosen experts
    weight: torch.Tensor  # [T, k] combine weights (fp32)


def router_logits(x: torch.Tensor, router: torch.Tensor, router_b: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] -> router one's logits [T, E] fp32. An fp32 router goes through the kernel library's fixed-order
    dot products (the same bits for a row at any T: a batched step routes all its decode rows in one call as
    each would be routed alone); otherwise, or without the library, `linear` (the reference)."""
    if router.dtype == torch.float32 and router_invariant(router):
        y = load_kernel().f32_rows_linear(contiguous_f32(x), router)
        return y if router_b is None else y + router_b
    return linear(x, router, router_b)


def row_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid with the same bits for a row at any row count. torch.sigmoid's CPU kernel computes a vectorized
    body and a scalar tail differently (within 1 ulp), so an element's bits depend on its position in the
    flattened tensor (a [T, 8] router: ~25 % of rows differ from the row alone); exp's do not."""
    return 1.0 / (1.0 + torch.exp(-x))


def router_invariant(router: torch.Tensor) -> bool:
    """Whether `router_logits` gives a row the same bits at any row count."""
    if router.dtype == torch.float32:
        return router.dim() == 2 and router.is_contiguous() and load_kernel() is not None
    return router.dtype in (torch.float16, torch.bfloat16)


def route(x: torch.Tensor, router: torch.Tensor, cfg: ModelConfig, bias: torch.Tensor | None = None,
          router_b: torch.Tensor | None = None) -> Routing:
    """Router one: pick each token's top-k experts. x [T,H] -> Routing. `bias` [E] (DeepSeek-V3's
    e_score_correction_bias) shifts the scores experts are chosen by, not their combine weights;
    `router_b` [E] is the router's own bias (GPT-OSS)."""
    logits = router_logits(x, router, router_b)  # [T, E] fp32
    if cfg.router_scoring == "linear":  # top-k of raw scores, chosen experts are summed unscaled
        idx = logits.topk(cfg.top_k, dim=-1).indices
        return Routing(idx, torch.ones_like(idx, dtype=torch.float32))
    if cfg.router_scoring == "sparsemixer":
        return sparsemixer(logits, cfg.sparsemixer_eps)
    scores = logits.softmax(dim=-1) if cfg.router_scoring == "softmax" else row_sigmoid(logits)  # [T, E]
    if bias is None and cfg.expert_groups == 1:
        weight, idx = scores.topk(cfg.top_k, dim=-1)
    else:
        choice = scores if bias is None else scores + bias
        idx = _within_best_groups(choice, cfg).topk(cfg.top_k, dim=-1).indices
        weight = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        total = weight.sum(dim=-1, keepdim=True)
        weight = weight / (total + 1e-20 if cfg.router_scoring == "sigmoid" else total)
    if cfg.routed_scaling_factor != 1.0:
        weight = weight * cfg.routed_scaling_factor
    return Routing(idx, weight)


def route_layer(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig) -> Routing:
    """`route` with the layer's router tensors (`prefix` = "layers.L.")."""
    return route(x, w[prefix + "router"], cfg, w.get(prefix + "router_bias"), w.get(prefix + "router_b"))


def guess_layer(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig) -> Routing:
    """The experts MoE layer `prefix` will likely choose, from x [T, H] = the residual stream before it is
    complete, normed with that layer's FFN norm: its fitted guess (`layers.N.guess`, routing/next_guess.py)
    where the store is calibrated, else its own router. Only ever used to read ahead."""
    P = w.get(prefix + "guess")
    if P is None:
        return route_layer(x, w, prefix, cfg)
    return route_by(x, P, w[prefix + "guess_b"], w, prefix, cfg)


def route_by(x: torch.Tensor, P: torch.Tensor, c: torch.Tensor, w: dict[str, torch.Tensor], prefix: str,
             cfg: ModelConfig) -> Routing:
    """`route_layer` with the router matrix replaced by P [E, H] and the bias c [E] added to the layer's own
    (the layer's choice bias and routing rule unchanged): a fitted guess, as used and as fitted."""
    own = w.get(prefix + "router_b")
    return route(x, P, cfg, w.get(prefix + "router_bias"), c if own is None else c + own.float())


def _within_best_groups(choice: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Group-limited choice (DeepSeek): experts form `expert_groups` equal groups; each token keeps the
    `topk_groups` groups with the best score (their best expert, or their best two summed) and sees -inf
    elsewhere. choice [T, E] -> [T, E]."""
    G = cfg.expert_groups
    if G == 1:
        return choice
    grouped = choice.view(choice.shape[0], G, -1)  # [T, G, E/G]
    if cfg.group_score == "top2":
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
    else:
        group_scores = grouped.amax(dim=-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(cfg.topk_groups, dim=-1).indices, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


def sparsemixer(logits: torch.Tensor, eps: float) -> Routing:
    """PhiMoE's router at inference (SparseMixer, arXiv 2409.12136, eval mode), two picks in turn. Pick one
    is the best expert; its weight is its softmax probability among the experts whose score is within a
    relative 2*eps of it, (best - s) / max(|s|, best) <= 2 eps. Pick two is the best of the rest, weighted
    the same way among the rest. logits [T, E] -> Routing with k = 2."""
    out_idx, out_weight = [], []
    scores = logits
    for _ in range(2):
        best, idx = scores.max(dim=-1, keepdim=True)  # [T, 1]
        near = (best - scores) / logits.abs().clamp(min=best) <= 2 * eps  # [T, E]
        probs = scores.masked_fill(~near, float("-inf")).softmax(dim=-1)
        out_idx.append(idx)
        out_weight.append(probs.gather(1, idx))
        scores = scores.scatter(1, idx, float("-inf"))
    return Routing(torch.cat(out_idx, dim=1), torch.cat(out_weight, dim=1))


# (expert, the provider's fn, x [T,H]) -> y [T,H]: how an expert that is not plain SwiGLU is computed
ExpertRunner = Callable[[int, ExpertFn, torch.Tensor], torch.Tensor]


def expert_runner(w: dict[str, torch.Tensor], prefix: str, cfg: ModelConfig) -> ExpertRunner | None:
    """None for plain SwiGLU experts (the provider's fused fn(x) is the expert). Otherwise (GPT-OSS: biases
    and a clamped activation) the expert's three matrices are applied one at a time through `fn.project`,
    still from the provider's (quantized) weights; the biases are resident (expert_b1/b3 [E,I], b2 [E,H])."""
    if cfg.expert_act == "swiglu" and not cfg.expert_bias:
        return None
    b1, b3, b2 = (w.get(prefix + n) for n in ("expert_b1", "expert_b3", "expert_b2"))

    def run(e: int, fn: ExpertFn, x: torch.Tensor) -> torch.Tensor:
        gate, up = fn.project("w1", x), fn.project("w3", x)  # [T, I]
        if b1 is not None:
            gate, up = gate + b1[e], up + b3[e]
        if cfg.expert_act == "clamped_swiglu":
            h = clamped_swiglu(gate, up, cfg.swiglu_alpha, cfg.swiglu_limit)
        else:
            h = F.silu(gate) * up
        y = fn.project("w2", h)  # [T, H]
        return y if b2 is None else y + b2[e]

    return run


def weighted_expert(e: int, fn: ExpertFn, x: torch.Tensor, weight: torch.Tensor, runner: ExpertRunner | None,
                    cfg: ModelConfig) -> torch.Tensor:
    """weight [T,1] * expert(x), or expert(weight * x) where the router scales the input (Llama 4)."""
    if cfg.expert_input_weighted:
        x = x * weight
    y = fn(x) if runner is None else runner(e, fn, x)
    return y if cfg.expert_input_weighted else y * weight


# (layer, x [T,H], routing, token bits [T], token price [T] or None) -> widths [T,k] (0: skip); see widths.py
WidthRule = Callable[[int, torch.Tensor, Routing, torch.Tensor, torch.Tensor | None], torch.Tensor]


def grouped_experts(
    xf: torch.Tensor, routing: Routing, bits: torch.Tensor, layer: int, cfg: ModelConfig, provider: ExpertProvider,
    runner: ExpertRunner | None = None, decode_rows: int = 0, chunk_starts: list[int] | None = None,
) -> torch.Tensor:
    """Group the T*k (token, expert, bits) triples by (expert, bits); each expert runs once on its tokens.
    bits [T,k] per chosen expert (0: skipped).

    Experts are computed as they become ready (overlapping the loads still running); their outputs are
    summed afterwards in (expert, bits) order, so the result does not depend on arrival order. For a batched
    step's rows (models/ragged.py), each token keeps the bits it gets alone: the first `decode_rows` rows
    (one decode token of a sequence each) run in pieces of at most the expert's `invariant_tokens`, each
    prefill chunk (its first row in `chunk_starts`) whole, unless all of the expert's rows fit in one such
    piece: then they run in one call (each row gets the bits it gets in its own chunk's call, which is no
    larger; a step prefilling 8 prompts made ~8 x more, smaller calls); without `chunk_starts`, all tokens in
    one call. A ready batch's pieces go to the expert type's `run_spans` when it has one (the CPU kernel: one
    call for all of them, bit for bit the per-piece loop kept below as its reference)."""
    T, k = routing.idx.shape
    if T == 1 and runner is None and not cfg.expert_input_weighted:
        return _one_row(xf, routing, bits, layer, provider)
    keys = (routing.idx * 16 + bits).reshape(-1)  # [T*k] one key per (expert, bits); bits 0: skipped
    order = torch.argsort(keys, stable=True)  # grouped by key, tokens ascending inside a group
    unique_keys, counts = torch.unique_consecutive(keys[order], return_counts=True)
    tokens = torch.div(order, k, rounding_mode="floor")  # the token of each sorted (token, rank)
    groups: dict[int, tuple[int, int]] = {}  # key -> its [start, stop) in the sorted order
    start = 0
    for key, n in zip(unique_keys.tolist(), counts.tolist()):
        groups[key] = (start, start + n)
        start += n
    demands = [(key // 16, key % 16, b - a) for key, (a, b) in groups.items() if key % 16]
    # every piece reads a slice of these (one gather each, not one per piece) and writes a slice of ys
    xs, ws = xf[tokens], routing.weight.reshape(-1)[order, None]
    ys = torch.zeros_like(xs)  # skipped rows stay 0
    tok = tokens.tolist() if chunk_starts is not None else []
    ends = None if chunk_starts is None else [*chunk_starts, T]
    fused = runner is None and not cfg.expert_input_weighted  # plain weight * expert(x): one call per batch
    for batch in provider.experts(layer, demands):
        pieces = []  # (expert, fn, a, e): ys[a:e] = ws[a:e] * fn(xs[a:e])
        for expert, b, fn in batch:
            a0, a1 = groups[expert * 16 + b]
            piece = 1 if ends is None else getattr(fn, "invariant_tokens", 1)
            if ends is None or a1 - a0 <= piece:  # every row's bits as in a call of its own rows alone
                pieces.append((expert, fn, a0, a1))
                continue
            cuts = [bisect_left(tok, c, a0, a1) for c in ends]  # decode rows end at cuts[0]
            pieces += [(expert, fn, a, min(a + piece, cuts[0])) for a in range(a0, cuts[0], piece)]
            pieces += [(expert, fn, a, e) for a, e in zip(cuts, cuts[1:]) if e > a]
        spans = getattr(type(pieces[0][1]), "run_spans", None) if fused and pieces else None
        if spans is None or not spans([p[1:] for p in pieces], xs, ws, ys):
            for expert, fn, a, e in pieces:  # the reference: one call per piece
                ys[a:e] = weighted_expert(expert, fn, xs[a:e], ws[a:e], runner, cfg)
    # one index_add_ in the sorted order: each token's experts added in (expert, bits) order, as `_one_row`
    return torch.zeros_like(xf).index_add_(0, tokens, ys)


def _one_row(xf: torch.Tensor, routing: Routing, bits: torch.Tensor, layer: int,
             provider: ExpertProvider) -> torch.Tensor:
    """`grouped_experts` for a single row (a batched step with one decode token), bit for bit: the experts
    in (expert, bits) order, each product rounded then added, in one kernel call when they share a width
    (the kernel sums that way) instead of one call each."""
    chosen = sorted((e * 16 + b, e, b, w) for e, b, w in
                    zip(routing.idx[0].tolist(), bits[0].tolist(), routing.weight[0].tolist()) if b > 0)
    fns: dict[int, ExpertFn] = {}
    for batch in provider.experts(layer, [(e, b, 1) for _, e, b, _ in chosen], hold=True):
        fns.update((e * 16 + b, fn) for e, b, fn in batch)
    ordered, weights = [fns[key] for key, *_ in chosen], [w for *_, w in chosen]
    many = getattr(type(ordered[0]), "run_many", None) if ordered else None
    if many is not None and (y := many(ordered, weights, xf)) is not None:
        return y
    out = torch.zeros_like(xf)
    for fn, w in zip(ordered, weights):
        out.add_(fn(xf) * torch.tensor([[w]]))
    return out


def add_dense_parts(out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: dict[str, torch.Tensor], prefix: str,
                    cfg: ModelConfig, lin: Linear = linear) -> torch.Tensor:
    """The routed experts' `out` [T,H] plus what every token gets: the shared expert (sigmoid-gated: Qwen2)
    and the learned vectors of the experts a token did not choose (idx [T,k] chosen). `lin` computes each
    matrix (a batched step's row-invariant calls)."""
    if cfg.shared_expert_intermediate:
        shared = swiglu(x, w[prefix + "shared.w1"], w[prefix + "shared.w3"], w[prefix + "shared.w2"], lin)
        if cfg.shared_expert_gate:
            shared = row_sigmoid(lin(x, w[prefix + "shared_gate"])) * shared
        out = out + shared
    if cfg.absent_expert_bias:  # fp32 [E, H] and its sum over experts, made once by the decoder
        # F.embedding gathers the same rows 2.6x faster than indexing
        out = out + (w[prefix + "absent_total"] - F.embedding(idx, w[prefix + "absent_bias"]).sum(1))
    return out


def _one_token(xf: torch.Tensor, idx: list[int], weight: list[float], bits: list[int], layer: int,
               provider: ExpertProvider, cfg: ModelConfig, runner: ExpertRunner | None = None) -> torch.Tensor:
    """Decode step: k distinct experts, no grouping. One token's experts cost a fraction of a millisecond
    against milliseconds per read, so they run together in one kernel call once all are ready, in routing
    order: every policy and arrival order gives bit-identical results. idx, weight, bits [k] (0: skipped)."""
    chosen = [(e, b, w) for e, b, w in zip(idx, bits, weight) if b > 0]
    fns: dict[int, object] = {}
    for batch in provider.experts(layer, [(e, b, 1) for e, b, _ in chosen], hold=True):
        fns.update((e, fn) for e, _, fn in batch)
    if not chosen:
        return torch.zeros_like(xf)
    if runner is not None or cfg.expert_input_weighted:
        return sum(weighted_expert(e, fns[e], xf, torch.tensor([[w]]), runner, cfg) for e, _, w in chosen)
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


def one_token_widths(layer: int, x: torch.Tensor, routing: Routing, idx: list[int], weight: list[float],
                     token_bits: torch.Tensor, price: torch.Tensor | None, widths: WidthRule | None) -> list[int]:
    """`chosen_widths` for one token x [1,H] as a list, through the rule's list path (`one`) if it has one:
    a decode step asks this in every MoE layer, twice with prefetch."""
    bits = int(token_bits[0])
    if widths is None:
        return [bits] * len(idx)
    one = getattr(widths, "one", None)
    if one is None:
        return widths(layer, x, routing, token_bits, price)[0].tolist()
    return one(layer, x, idx, weight, bits, None if price is None else float(price[0]))


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
    routing = routing if routing is not None else route_layer(x, w, prefix, cfg)
    if x.shape[0] == 1:
        idx, weight = routing.idx[0].tolist(), routing.weight[0].tolist()
        bits = one_token_widths(layer, x, routing, idx, weight, token_bits, price, widths)
        if width_hist is not None:
            counts = width_hist.numpy()  # a view: k scalar increments, not 3 tensor ops each
            for b in bits:
                counts[b] += 1
        out = _one_token(x.float(), idx, weight, bits, layer, provider, cfg, expert_runner(w, prefix, cfg))
    else:
        bits_tk = chosen_widths(layer, x, routing, token_bits, price, widths)
        if width_hist is not None:
            width_hist += torch.bincount(bits_tk.reshape(-1), minlength=width_hist.numel())
        out = grouped_experts(x.float(), routing, bits_tk, layer, cfg, provider, expert_runner(w, prefix, cfg))
    return add_dense_parts(out, x, routing.idx, w, prefix, cfg).to(x.dtype)
