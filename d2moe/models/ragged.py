"""One forward step over many sequences at once (continuous batching), batch-invariant by construction.

A step's rows are the new tokens of several sequences, flattened: first one decode token per decoding
sequence (the "decode block"), then whole prefill chunks. Dense matrices and every MoE layer see all rows
together (an expert loaded once serves every token that chose it); attention runs per sequence against its
own KV slot (`KVPool`, per-slot lengths).

Batching invariance: a sequence's tokens must come out bit-identical whatever else shares the step. CPU
kernels are row-invariant only within limits, measured here (2 cores, AVX-512, torch 2.13):
- fp16 / bf16 `F.linear`: the same bits for a row at any row count;
- int8 `_weight_int8pack_mm`: the same bits up to KERNEL_MAX_TOKENS rows; beyond, a bf16 GEMM;
- fp32 `F.linear` (MKL): a row's bits change with the row count, even from 1 to 2 rows;
- the MWQ expert kernel: the same bits while the kernel kind does not change (`BoundExpert.invariant_tokens`,
  16 or 3 tokens), float GEMM beyond.
So each prefill chunk is always computed as its own call (its chunks are the same alone or batched: fixed
boundaries at multiples of the chunk size), and the decode block is split into calls of at most the
invariant row count of each matrix (one row at a time for fp32, e.g. routers). `tests/unit/test_ragged.py`
checks every piece against running each sequence alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.config import ModelConfig
from d2moe.models.decoder import MoEDecoder
from d2moe.models.dense import KERNEL_MAX_TOKENS, DenseWeight, Int8Matrix
from d2moe.models.expert_provider import ExpertProvider
from d2moe.models.layers import embedding, linear, rms_norm
from d2moe.models.moe import Routing, WidthRule, chosen_widths, predict_demands, route

UNBOUNDED = 1 << 30
PREFETCH_MAX_ROWS = 8  # decode-only steps up to this many sequences predict the next layer's experts


# Model features the batched step does not implement yet, as (config field, the value that means "off"):
# read with getattr so a config without the field (older families) passes. A store that needs one is refused
# by the serving engine with a clear error instead of being served wrong.
_PLAIN = (("attention", "gqa"), ("rope_scaling", None), ("rotary_dim", 0), ("softmax_scale", 0.0),
          ("attention_sinks", False), ("sliding_window", 0), ("attention_chunk", 0), ("nope_layers", ()),
          ("temperature_floor", 0), ("norm", "rms"), ("embedding_multiplier", 1.0), ("residual_multiplier", 1.0),
          ("logit_scale", 1.0), ("lm_head_bias", False), ("router_bias", False), ("expert_groups", 1),
          ("topk_groups", 1), ("routed_scaling_factor", 1.0), ("expert_input_weighted", False),
          ("router_linear_bias", False), ("expert_act", "swiglu"), ("expert_bias", False))
_ROUTER_SCORING = ("softmax", "linear")


def unsupported_features(cfg: ModelConfig) -> list[str]:
    """The config's features the batched step cannot run (empty: it runs this model exactly)."""
    out = [f"{name}={getattr(cfg, name)!r}" for name, plain in _PLAIN if getattr(cfg, name, plain) != plain]
    if cfg.router_scoring not in _ROUTER_SCORING:
        out.append(f"router_scoring={cfg.router_scoring!r}")
    return out


def invariant_rows(w: DenseWeight) -> int:
    """Most rows one `linear` call may take while each row gets the bits it gets alone (see module doc)."""
    if isinstance(w, Int8Matrix):
        return KERNEL_MAX_TOKENS
    return UNBOUNDED if w.dtype in (torch.float16, torch.bfloat16) else 1


@dataclass(frozen=True)
class Segment:
    """The rows of one sequence in a step: a decode token or a prefill chunk."""

    slot: int  # the sequence's KV slot
    start: int  # position of its first row in the sequence (= tokens already in its KV slot)
    row: int  # first row in the step
    length: int
    decode: bool


@dataclass(frozen=True)
class StepPlan:
    """Where a step's rows come from and which calls they may share. Decode segments come first."""

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        row, seen_prefill = 0, False
        for s in self.segments:
            if s.row != row or s.length < 1 or (s.decode and (s.length != 1 or seen_prefill)):
                raise ValueError("segments must tile the rows: decode tokens first, then prefill chunks")
            seen_prefill |= not s.decode
            row += s.length

    @property
    def rows(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def decode_rows(self) -> int:
        return sum(1 for s in self.segments if s.decode)

    def positions(self) -> torch.Tensor:
        """[N] each row's position in its sequence."""
        return torch.cat([torch.arange(s.start, s.start + s.length) for s in self.segments])

    def slots(self) -> torch.Tensor:
        """[N] each row's KV slot."""
        return torch.cat([torch.full((s.length,), s.slot) for s in self.segments])

    def blocks(self, limit: int) -> list[tuple[int, int]]:
        """Row ranges of calls that keep every row invariant: the decode block cut into pieces of at most
        `limit` rows, every prefill chunk whole (if `limit` is unbounded, one range)."""
        n, d = self.rows, self.decode_rows
        if limit >= UNBOUNDED:
            return [(0, n)] if n else []
        out = [(a, min(a + limit, d)) for a in range(0, d, limit)]
        out += [(s.row, s.row + s.length) for s in self.segments if not s.decode]
        return out

    def linear(self, x: torch.Tensor, w: DenseWeight, b: torch.Tensor | None = None) -> torch.Tensor:
        """`layers.linear` over the rows, in row-invariant calls. x [N, in] -> [N, out]."""
        blocks = self.blocks(invariant_rows(w))
        if len(blocks) == 1:
            return linear(x, w, b)
        return torch.cat([linear(x[a:e], w, b) for a, e in blocks])

    def select(self, rows: list[tuple[int, int]]) -> StepPlan:
        """The plan of a subset of rows (whole decode rows, or a tail of each prefill chunk): for the head."""
        segs, row = [], 0
        for s, (a, e) in zip(self.segments, rows):
            if e > a:
                segs.append(Segment(s.slot, s.start + (a - s.row), row, e - a, s.decode))
                row += e - a
        return StepPlan(tuple(segs))


class KVPool:
    """Static key/value buffers for `slots` sequences, each slot with its own length.

    fp32 like the single-request KVCache; memory is reserved for slots x max_len positions, but pages are
    only touched as sequences fill them (torch.zeros maps fresh pages lazily)."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        shape = (slots, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.slots, self.max_len = slots, max_len
        self.lengths = [0] * slots
        self._free = list(range(slots - 1, -1, -1))

    @staticmethod
    def nbytes_for(cfg: ModelConfig, slots: int, max_len: int) -> int:
        return 2 * cfg.num_layers * slots * cfg.num_kv_heads * max_len * cfg.head_dim * 4

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """A free slot (length 0), or None when all are taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"KV slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)


def _rope_rows(rope, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`Rope.rotate` with a position per row: x [N, h, D]."""
    cos, sin = rope.cos_h[positions], rope.sin_signed_h[positions]  # [N, 1, D]
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def _mask(start: int, T: int) -> torch.Tensor | None:
    """Causal over the new tokens, full view of the cached prefix (as layers.attention)."""
    return None if T == 1 else torch.ones(T, start + T, dtype=torch.bool).tril(diagonal=start)


def attend_per_sequence(q: torch.Tensor, pool: KVPool, layer: int, plan: StepPlan, gqa: bool) -> torch.Tensor:
    """Reference (and default) attention core: one SDPA per segment over its own slot. q [N, nH, D] ->
    [N, nH, D]. Each sequence sees exactly the shapes it sees alone."""
    outs = []
    for s in plan.segments:
        S = s.start + s.length
        qs = q[s.row : s.row + s.length].transpose(0, 1)[None]  # [1, nH, T, D]
        keys, values = pool.k[layer][s.slot : s.slot + 1, :, :S], pool.v[layer][s.slot : s.slot + 1, :, :S]
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=_mask(s.start, s.length), enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))  # [T, nH, D]
    return torch.cat(outs)


def attend_decode_padded(q: torch.Tensor, pool: KVPool, layer: int, plan: StepPlan, gqa: bool) -> torch.Tensor:
    """Fast-path candidate: every decode row in one SDPA over keys padded to the longest slot (a boolean
    mask hides the padding); prefill segments as in the reference. Not batch-invariant (the padded length
    changes the kernel's blocking), hence not the default; see benchmarks/ragged_attention.py."""
    d = plan.decode_rows
    if d <= 1:
        return attend_per_sequence(q, pool, layer, plan, gqa)
    dec = plan.segments[:d]
    slots = torch.tensor([s.slot for s in dec])
    lengths = torch.tensor([s.start + 1 for s in dec])
    S = int(lengths.max())
    keys, values = pool.k[layer][slots, :, :S], pool.v[layer][slots, :, :S]  # [d, nKV, S, D] (gathered copies)
    mask = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]  # [d, 1, 1, S]
    o = F.scaled_dot_product_attention(q[:d, :, None], keys, values, attn_mask=mask, enable_gqa=gqa)  # [d,nH,1,D]
    rest = StepPlan(tuple(Segment(s.slot, s.start, s.row - d, s.length, False) for s in plan.segments[d:]))
    parts = [o[:, :, 0]]
    if rest.segments:
        parts.append(attend_per_sequence(q[d:], pool, layer, rest, gqa))
    return torch.cat(parts)


def ragged_attention(x: torch.Tensor, w: dict, prefix: str, cfg: ModelConfig, rope, pool: KVPool, layer: int,
                     plan: StepPlan, positions: torch.Tensor, slots: torch.Tensor,
                     padded: bool = False) -> torch.Tensor:
    """`layers.attention` for a step's rows: projections over all rows, k/v written to each row's slot and
    position, attention per sequence. x [N, H] -> [N, H]."""
    N = x.shape[0]
    nH, nKV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    fused = w.get(prefix + "wqkv")
    if fused is not None:
        q, k, v = plan.linear(x, fused, w.get(prefix + "bqkv")).split((nH * D, nKV * D, nKV * D), dim=-1)
    else:
        q = plan.linear(x, w[prefix + "wq"], w.get(prefix + "bq"))
        k = plan.linear(x, w[prefix + "wk"], w.get(prefix + "bk"))
        v = plan.linear(x, w[prefix + "wv"], w.get(prefix + "bv"))
    if cfg.qk_norm == "full":
        q = rms_norm(q, w[prefix + "q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w[prefix + "k_norm"], cfg.rms_norm_eps)
    q, k, v = q.reshape(N, nH, D), k.reshape(N, nKV, D), v.reshape(N, nKV, D)
    if cfg.qk_norm == "head":
        q = rms_norm(q, w[prefix + "q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w[prefix + "k_norm"], cfg.rms_norm_eps)
    q, k = _rope_rows(rope, q, positions), _rope_rows(rope, k, positions)
    pool.k[layer][slots, :, positions] = k  # [N, nKV, D] into (slot, :, position)
    pool.v[layer][slots, :, positions] = v
    attend = attend_decode_padded if padded else attend_per_sequence
    out = attend(q, pool, layer, plan, nH != nKV)  # [N, nH, D]
    return plan.linear(out.reshape(N, nH * D), w[prefix + "wo"])


def _route_rows(x: torch.Tensor, w: dict, prefix: str, layer: int, cfg: ModelConfig, plan: StepPlan,
                token_bits: torch.Tensor, price: torch.Tensor | None,
                widths: WidthRule | None) -> tuple[Routing, torch.Tensor]:
    """Router one and the width rule per row-invariant block (routers are fp32: a decode row at a time)."""
    router = w[prefix + "router"]
    idx, weight, bits = [], [], []
    for a, e in plan.blocks(invariant_rows(router)):
        r = route(x[a:e], router, cfg)
        bits.append(chosen_widths(layer, x[a:e], r, token_bits[a:e], None if price is None else price[a:e], widths))
        idx.append(r.idx)
        weight.append(r.weight)
    return Routing(torch.cat(idx), torch.cat(weight)), torch.cat(bits)


def ragged_moe(x: torch.Tensor, w: dict, prefix: str, layer: int, cfg: ModelConfig, provider: ExpertProvider,
               plan: StepPlan, token_bits: torch.Tensor, price: torch.Tensor | None, widths: WidthRule | None,
               width_hist: torch.Tensor | None, row_hist: torch.Tensor | None = None) -> torch.Tensor:
    """`moe.moe_block` for a step's rows: one demand set and one pass over the provider for every row; each
    (expert, width) runs on its decode rows in invariant pieces and on each prefill chunk's rows whole; a
    row's expert outputs are summed in (expert, width) order. x [N, H] -> [N, H]."""
    routing, bits_tk = _route_rows(x, w, prefix, layer, cfg, plan, token_bits, price, widths)
    if width_hist is not None:
        width_hist += torch.bincount(bits_tk.reshape(-1), minlength=width_hist.numel())
    if row_hist is not None:  # [N, 16] per row: chosen experts at each width (0: skipped)
        row_hist.scatter_add_(1, bits_tk, torch.ones_like(bits_tk))
    xf = x.float()
    N, k = routing.idx.shape
    keys = (routing.idx * 16 + bits_tk).reshape(-1)  # [N*k] one key per (expert, width); width 0: skipped
    order = torch.argsort(keys, stable=True)  # grouped by key, rows ascending inside a group
    unique_keys, counts = torch.unique_consecutive(keys[order], return_counts=True)
    groups_of: dict[int, torch.Tensor] = {}  # key -> flat (row, rank) indices choosing it
    start = 0
    for key, n in zip(unique_keys.tolist(), counts.tolist()):
        groups_of[key] = order[start : start + n]
        start += n
    demands = [(key // 16, key % 16, len(sel)) for key, sel in groups_of.items() if key % 16]
    flat_weight = routing.weight.reshape(-1)
    d = plan.decode_rows
    chunk_starts = torch.tensor([s.row for s in plan.segments[d:]] + [N])  # prefill chunks' first rows, end
    parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for batch in provider.experts(layer, demands):
        for expert, b, fn in batch:
            key = expert * 16 + b
            sel = groups_of[key]
            rows = torch.div(sel, k, rounding_mode="floor")  # ascending
            # decode rows in pieces the kernel computes as it would alone; each prefill chunk whole
            cuts = torch.searchsorted(rows, chunk_starts).tolist()
            piece = getattr(fn, "invariant_tokens", 1)
            spans = [(a, min(a + piece, cuts[0])) for a in range(0, cuts[0], piece)]
            spans += [(a, e) for a, e in zip(cuts, cuts[1:]) if e > a]
            for a, e in spans:
                t = rows[a:e]
                parts.append((key, t, fn(xf[t]) * flat_weight[sel[a:e], None]))
    out = torch.zeros_like(xf)
    for _, t, y in sorted(parts, key=lambda p: p[0]):  # stable: pieces of one key keep their order
        out.index_add_(0, t, y)
    if cfg.shared_expert_intermediate:
        h = F.silu(plan.linear(x, w[prefix + "shared.w1"])) * plan.linear(x, w[prefix + "shared.w3"])
        shared = plan.linear(h, w[prefix + "shared.w2"])
        if cfg.shared_expert_gate:
            shared = torch.sigmoid(plan.linear(x, w[prefix + "shared_gate"])) * shared
        out = out + shared
    if cfg.absent_expert_bias:  # fp32 [E, H] and its sum over experts, made once by the decoder
        out = out + (w[prefix + "absent_total"] - w[prefix + "absent_bias"][routing.idx].sum(1))
    return out.to(x.dtype)


@torch.inference_mode()
def ragged_forward(decoder: MoEDecoder, tokens: torch.Tensor, plan: StepPlan, pool: KVPool,
                   token_bits: torch.Tensor, price: torch.Tensor | None, logit_rows: list[tuple[int, int]],
                   padded_attention: bool = False, row_hist: torch.Tensor | None = None) -> torch.Tensor:
    """tokens [N] (rows as `plan` lays them out), token_bits [N], price [N] (NaN: fixed width) or None ->
    logits [M, V] for the rows in `logit_rows` (one (first, end) range per segment, in order). Advances the
    slots' lengths in `pool`. `row_hist` [N, 16], if given, counts each row's experts per width."""
    cfg, w = decoder.cfg, decoder.w
    N = tokens.shape[0]
    positions, slots = plan.positions(), plan.slots()
    if int(positions.max()) >= pool.max_len:
        raise ValueError(f"a sequence exceeds the KV cache ({pool.max_len} positions)")
    h = embedding(tokens[None], w["embed"])[0]  # [N, H] fp32
    prefetch = decoder.prefetch and plan.decode_rows == N <= PREFETCH_MAX_ROWS
    for L in range(cfg.num_layers):
        p = f"layers.{L}."
        xa = rms_norm(h, w[p + "attn_norm"], cfg.rms_norm_eps)
        h = h + ragged_attention(xa, w, p, cfg, decoder.rope, pool, L, plan, positions, slots, padded_attention)
        x = rms_norm(h, w[p + "ffn_norm"], cfg.rms_norm_eps)
        if L in cfg.dense_layers:
            h = h + plan.linear(F.silu(plan.linear(x, w[p + "ffn.w1"])) * plan.linear(x, w[p + "ffn.w3"]),
                                w[p + "ffn.w2"])
            continue
        nxt = decoder.next_moe.get(L)
        if prefetch and nxt is not None and decoder.provider.wants_prefetch(nxt, int(token_bits.max())):
            # I/O only (never changes a result): the next MoE layer's router on this residual stream
            guess_x = rms_norm(h, w[f"layers.{nxt}.ffn_norm"], cfg.rms_norm_eps)
            guess = route(guess_x, w[f"layers.{nxt}.router"], cfg)
            bits_tk = chosen_widths(nxt, guess_x, guess, token_bits, price, decoder.widths)
            decoder.provider.prefetch(nxt, predict_demands(guess, bits_tk))
        h = h + ragged_moe(x, w, p, L, cfg, decoder.provider, plan, token_bits, price, decoder.widths,
                           decoder.width_hist, row_hist)
    for s in plan.segments:
        pool.lengths[s.slot] = s.start + s.length
    sel = torch.cat([torch.arange(a, e) for a, e in logit_rows]) if logit_rows else torch.zeros(0, dtype=torch.long)
    if sel.numel() == 0:
        return torch.zeros(0, cfg.vocab_size)
    head_plan = plan.select(logit_rows)
    return head_plan.linear(rms_norm(h[sel], w["norm"], cfg.rms_norm_eps), decoder.lm_head)
