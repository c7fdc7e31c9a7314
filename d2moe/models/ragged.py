"""One forward step over many sequences at once (continuous batching), batch-invariant by construction.

A step's rows are the new tokens of several sequences, flattened: first one decode token per decoding
sequence (the "decode block"), then whole prefill chunks. Dense matrices and every MoE layer see all rows
together (an expert loaded once serves every token that chose it); attention runs per sequence against its
own KV slot (`KVPool`, per-slot lengths).

Every family the single-request decoder runs, runs here from the same building blocks: the row-wise parts
(`layers.qkv_heads`, `layers.positioned`, `mla.mla_rows`, `layers.norm`, `layers.swiglu`, the decoder's
`embed` and `head`) take all rows at once with each matrix through `StepPlan.linear`; the per-sequence cores
(`layers.attend`: masks, windows, chunks, sinks, scale; `mla.mla_attend`) run once per sequence with
exactly the shapes that sequence has alone; the MoE block shares `moe.route_layer`, `moe.grouped_experts`
(expert runners, input-weighted experts) and `moe.add_dense_parts` (shared and absent experts).

Batching invariance: a sequence's tokens must come out bit-identical whatever else shares the step. CPU
kernels are row-invariant only within limits, measured here (2 cores, AVX-512, torch 2.13):
- fp16: d2moe's kernel (models/dense_f16.py `float16_linear`), bf16 `F.linear`: the same bits for a row at any row count;
- int8 `_weight_int8pack_mm`: the same bits up to KERNEL_MAX_TOKENS rows; beyond, a bf16 GEMM;
- int8 blocks (`int8_blocks_linear`, each token's activations quantized alone): the same bits at any row count;
- fp32 `F.linear` (MKL): a row's bits change with the row count, even from 1 to 2 rows;
- the MWQ expert kernel: the same bits while the kernel kind does not change (`BoundExpert.invariant_tokens`:
  256 tokens for msb experts, any count on byte codes, 3 for residual ones), float GEMM beyond.
So each prefill chunk is always computed as its own call (its chunks are the same alone or batched: fixed
boundaries at multiples of the chunk size), and the decode block is split into calls of at most the
invariant row count of each matrix (one row at a time for fp32, e.g. routers). `tests/unit/test_ragged.py`
checks every piece against running each sequence alone, for every family.

Against the single-request decoder (`MoEDecoder.forward` on one sequence, prefilled in the same chunks) a
step agrees to float rounding, not bit for bit: a lone decode token there sums its experts in one kernel
call in routing order (`moe._one_token`), here in (expert, width) order with the other rows' tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.config import ModelConfig
from d2moe.models.decoder import MoEDecoder
from d2moe.models.dense import KERNEL_MAX_TOKENS, DenseWeight, Int8Blocks, Int8Matrix
from d2moe.models.dense_f16 import Float16Blocks
from d2moe.models.expert_provider import ExpertProvider
from d2moe.models.kv_window import cache_len, is_ring, ring_write, window_keys
from d2moe.models.layers import (
    attend,
    block_input,
    block_output,
    causal_mask,
    decode_attention,
    decode_rows_kernel,
    kv_cache_dims,
    linear,
    positioned,
    qkv_heads,
    swiglu,
)
from d2moe.models.mla import mla_attend, mla_rows, up_projection
from d2moe.models.moe import (
    Routing,
    WidthRule,
    add_dense_parts,
    chosen_widths,
    expert_runner,
    grouped_experts,
    guess_layer,
    predict_demands,
    route_layer,
    router_invariant,
)

UNBOUNDED = 1 << 30
PREFETCH_MAX_ROWS = 8  # decode-only steps up to this many sequences predict the next layer's experts


def invariant_rows(w: DenseWeight) -> int:
    """Most rows one `linear` call may take while each row gets the bits it gets alone (see module doc)."""
    if isinstance(w, Int8Matrix):
        return 1 if w.grouped else KERNEL_MAX_TOKENS  # grouped and not blocked: an fp32 GEMM (rare)
    if isinstance(w, Float16Blocks | Int8Blocks):
        return UNBOUNDED
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
        """`layers.linear` over the rows, in row-invariant calls. x [..., N, in] -> [..., N, out]."""
        blocks = self.blocks(invariant_rows(w))
        if len(blocks) == 1:
            return linear(x, w, b)
        return torch.cat([linear(x[..., a:e, :], w, b) for a, e in blocks], dim=-2)

    def select(self, rows: list[tuple[int, int]]) -> StepPlan:
        """The plan of a subset of rows (whole decode rows, or a tail of each prefill chunk): for the head."""
        segs, row = [], 0
        for s, (a, e) in zip(self.segments, rows):
            if e > a:
                segs.append(Segment(s.slot, s.start + (a - s.row), row, e - a, s.decode))
                row += e - a
        return StepPlan(tuple(segs))


class KVPool:
    """Static key/value buffers for `slots` sequences, each slot with its own length; the layout of the
    single-request KVCache (`layers.kv_cache_dims`: MLA caches its latent as one head and no values).

    fp32 like the single-request KVCache; memory is reserved for slots x max_len positions, but pages are
    only touched as sequences fill them (torch.zeros maps fresh pages lazily)."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype = torch.float32) -> None:
        heads, k_dim, v_dim = kv_cache_dims(cfg)
        lens = [cache_len(cfg, L, max_len) for L in range(cfg.num_layers)]  # sliding/chunked: a ring of its span
        self.k = [torch.zeros((slots, heads, n, k_dim), dtype=dtype) for n in lens]
        self.v = [torch.zeros((slots, heads, n, v_dim), dtype=dtype) for n in lens]
        self.slots, self.max_len = slots, max_len
        self.lengths = [0] * slots
        self._free = list(range(slots - 1, -1, -1))

    @staticmethod
    def nbytes_for(cfg: ModelConfig, slots: int, max_len: int) -> int:
        heads, k_dim, v_dim = kv_cache_dims(cfg)
        positions = sum(cache_len(cfg, L, max_len) for L in range(cfg.num_layers))
        return slots * heads * positions * (k_dim + v_dim) * 4

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


# (q [1,T,nH,D] of one sequence's tokens at positions start.., its keys and values [1,nKV,start+T,D], start)
# -> [1,T,nH*D]: a layer's per-sequence attention core (`layers.attend` with the model's masks and softmax)
Core = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _plain_core(qs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
    """Causal SDPA at the default scale (a plain model's `layers.attend`)."""
    o = F.scaled_dot_product_attention(qs.transpose(1, 2), keys, values, attn_mask=causal_mask(qs.shape[1], start),
                                       enable_gqa=qs.shape[2] != keys.shape[1])
    return o.transpose(1, 2).reshape(1, qs.shape[1], -1)


def attend_per_sequence(q: torch.Tensor, pool: KVPool, layer: int, plan: StepPlan, gqa: bool = True,
                        core: Core | None = None) -> torch.Tensor:
    """Reference (and default) attention core: one `core` call per segment over its own slot (default: plain
    causal SDPA; `gqa` is read from the shapes). q [N, nH, D] -> [N, nH*D]. Each sequence sees exactly the
    shapes it sees alone."""
    core = core or _plain_core
    outs = []
    for s in plan.segments:
        S = s.start + s.length
        keys, values = pool.k[layer][s.slot : s.slot + 1, :, :S], pool.v[layer][s.slot : s.slot + 1, :, :S]
        outs.append(core(q[None, s.row : s.row + s.length], keys, values, s.start)[0])
    return torch.cat(outs)


def attend_decode_padded(q: torch.Tensor, pool: KVPool, layer: int, plan: StepPlan, gqa: bool = True,
                         core: Core | None = None, scale: float | None = None) -> torch.Tensor:
    """Fast-path candidate for layers whose decode attention is plain (no sinks, window or chunk): every
    decode row in one SDPA over keys padded to the longest slot (a boolean mask hides the padding); prefill
    segments as in the reference. Not batch-invariant (the padded length changes the kernel's blocking),
    hence not the default; see benchmarks/batching.py. Returns what `attend_per_sequence` returns."""
    d = plan.decode_rows
    if d <= 1:
        return attend_per_sequence(q, pool, layer, plan, gqa, core)
    dec = plan.segments[:d]
    slots = torch.tensor([s.slot for s in dec])
    lengths = torch.tensor([s.start + 1 for s in dec])
    S = int(lengths.max())
    keys, values = pool.k[layer][slots, :, :S], pool.v[layer][slots, :, :S]  # [d, nKV, S, D] (gathered copies)
    mask = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]  # [d, 1, 1, S]
    o = F.scaled_dot_product_attention(q[:d, :, None], keys, values, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != keys.shape[1])  # [d, nH, 1, D]
    rest = StepPlan(tuple(Segment(s.slot, s.start, s.row - d, s.length, False) for s in plan.segments[d:]))
    parts = [o[:, :, 0].reshape(d, -1)]
    if rest.segments:
        parts.append(attend_per_sequence(q[d:], pool, layer, rest, gqa, core))
    return torch.cat(parts)


def attend_decode_kernel(q: torch.Tensor, pool: KVPool, layer: int, plan: StepPlan, cfg: ModelConfig,
                         core: Core | None = None) -> torch.Tensor | None:
    """Layers whose decode attention is plain (no sinks, window or chunk): every decode row in one call of
    d2moe's decode-attention kernel (`layers.decode_attention`) over each row's own slot and length (no
    copies; a row's result does not depend on the others, so batch-invariant), prefill segments as in the
    reference. None where the kernel does not apply: the caller takes the reference."""
    d = plan.decode_rows
    if not d:
        return None
    dec = plan.segments[:d]
    slots = torch.tensor([s.slot for s in dec])
    lengths = torch.tensor([s.start + 1 for s in dec])
    o = decode_attention(q[:d], pool.k[layer], pool.v[layer], slots, lengths, cfg)
    if o is None:
        return None
    rest = StepPlan(tuple(Segment(s.slot, s.start, s.row - d, s.length, False) for s in plan.segments[d:]))
    parts = [o.reshape(d, -1)]
    if rest.segments:
        parts.append(attend_per_sequence(q[d:], pool, layer, rest, core=core))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def ragged_attention(x: torch.Tensor, w: dict, prefix: str, cfg: ModelConfig, rope, pool: KVPool, layer: int,
                     plan: StepPlan, positions: torch.Tensor, slots: torch.Tensor,
                     padded: bool = False) -> torch.Tensor:
    """`layers.attention` for a step's rows: projections and positions over all rows, k/v written to each
    row's slot and position, the core (`layers.attend`) per sequence. x [1, N, H] -> [1, N, H]. A step of
    decode rows only takes one kernel call after the fused projection (`layers.decode_rows_kernel`, the same
    bits)."""
    fused = w.get(prefix + "wqkv")
    if not padded and fused is not None and plan.decode_rows == plan.rows:
        qkv = plan.linear(x, fused, w.get(prefix + "bqkv"))[0]  # [N, (nH + 2 nKV) D]
        out = decode_rows_kernel(qkv.contiguous(), cfg, rope, pool.k[layer], pool.v[layer], layer,
                                 [s.slot for s in plan.segments], [s.start for s in plan.segments])
        if out is not None:
            return plan.linear(out[None], w[prefix + "wo"], w.get(prefix + "bo"))
    q, k, v = qkv_heads(x, w, prefix, cfg, plan.linear)  # [1, N, h, D]
    q, k = positioned(q, k, cfg, rope, positions, layer, w, prefix)
    if is_ring(pool.k[layer], pool.max_len):
        out = _ring_attention(q[0], k[0], v[0], w, prefix, cfg, pool, layer, plan)
        return plan.linear(out[None], w[prefix + "wo"], w.get(prefix + "bo"))
    pool.k[layer][slots, :, positions] = k[0]  # [N, nKV, D] into (slot, :, position)
    pool.v[layer][slots, :, positions] = v[0]

    def core(qs: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        return attend(qs, keys, values, w, prefix, cfg, start, layer)

    plain_decode = not (cfg.attention_sinks or layer in cfg.sliding_layers or layer in cfg.chunked_layers)
    out = None
    if padded and plain_decode:
        out = attend_decode_padded(q[0], pool, layer, plan, core=core, scale=cfg.softmax_scale or None)
    elif plain_decode:
        out = attend_decode_kernel(q[0], pool, layer, plan, cfg, core)
    if out is None:
        out = attend_per_sequence(q[0], pool, layer, plan, core=core)
    return plan.linear(out[None], w[prefix + "wo"], w.get(prefix + "bo"))


def _ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: dict, prefix: str, cfg: ModelConfig,
                    pool: KVPool, layer: int, plan: StepPlan) -> torch.Tensor:
    """A sliding/chunked layer's ring (models/kv_window.py), per sequence as alone: its previous positions
    and its new keys, attend, then write. q [N, nH, D], k/v [N, nKV, D] -> [N, nH*D]."""
    outs = []
    for s in plan.segments:
        rows, one = slice(s.row, s.row + s.length), slice(s.slot, s.slot + 1)
        k_new, v_new = k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None]  # [1, nKV, T, D]
        keys, values, key_pos = window_keys(pool.k[layer], pool.v[layer], one, s.start, k_new, v_new)
        outs.append(attend(q[None, rows], keys, values, w, prefix, cfg, s.start, layer, key_pos)[0])
        ring_write(pool.k[layer], pool.v[layer], one, s.start, k_new, v_new)
    return torch.cat(outs)


def ragged_mla_attention(x: torch.Tensor, w: dict, prefix: str, cfg: ModelConfig, rope, pool: KVPool, layer: int,
                         plan: StepPlan, positions: torch.Tensor, slots: torch.Tensor,
                         padded: bool = False) -> torch.Tensor:
    """`mla.mla_attention` for a step's rows: projections over all rows, each row's latent written to its
    slot and position, the core (`mla.mla_attend`: absorbed query, SDPA over the latent, value up-projection)
    per sequence. x [1, N, H] -> [1, N, H]. `padded` does not apply (no plain per-head keys)."""
    q_nope, q_rope, entries = mla_rows(x, w, prefix, cfg, rope, positions, plan.linear)
    pool.k[layer][slots, 0, positions] = entries[0]  # [N, r + dr]
    up = up_projection(w[prefix + "wkv_b"], cfg)
    outs = []
    for s in plan.segments:
        rows, latent = slice(s.row, s.row + s.length), pool.k[layer][s.slot : s.slot + 1, :, : s.start + s.length]
        outs.append(mla_attend(q_nope[:, rows], q_rope[:, rows], latent, up, cfg, s.start))
    return plan.linear(torch.cat(outs, dim=1), w[prefix + "wo"], w.get(prefix + "bo"))


def _route_rows(x: torch.Tensor, w: dict, prefix: str, layer: int, cfg: ModelConfig, plan: StepPlan,
                token_bits: torch.Tensor, price: torch.Tensor | None,
                widths: WidthRule | None) -> tuple[Routing, torch.Tensor]:
    """`moe.route_layer` and the width rule. All the step's rows are routed in one call where the router gives
    a row the same bits at any row count (`moe.router_invariant`: fp32 routers through the kernel library) and
    the width rule decides each row alone (`rows`: router two's one-token rule, which `RoutedWidths` applies to
    every token, alone or batched; no rule: the request's width). Else per row-invariant block: decode rows
    one at a time (16 rows x 28 layers of small calls were ~15 % of a 16-row step), prefill chunks whole."""
    batched = plan.rows > 0 and router_invariant(w[prefix + "router"]) and (widths is None or hasattr(widths, "rows"))
    if batched:
        blocks = [(0, plan.rows)]
    else:
        blocks = plan.blocks(invariant_rows(w[prefix + "router"]))
    idx, weight, bits = [], [], []
    for a, e in blocks:
        r = route_layer(x[a:e], w, prefix, cfg)
        bits.append(chosen_widths(layer, x[a:e], r, token_bits[a:e], None if price is None else price[a:e], widths))
        idx.append(r.idx)
        weight.append(r.weight)
    return Routing(torch.cat(idx), torch.cat(weight)), torch.cat(bits)


def ragged_moe(x: torch.Tensor, w: dict, prefix: str, layer: int, cfg: ModelConfig, provider: ExpertProvider,
               plan: StepPlan, token_bits: torch.Tensor, price: torch.Tensor | None, widths: WidthRule | None,
               width_hist: torch.Tensor | None, row_hist: torch.Tensor | None = None) -> torch.Tensor:
    """`moe.moe_block` for a step's rows: one demand set and one pass over the provider for every row; each
    (expert, width) runs on its decode rows in invariant pieces and on each prefill chunk's rows whole
    (`moe.grouped_experts`); a row's expert outputs are summed in (expert, width) order. x [N, H] -> [N, H]."""
    routing, bits_tk = _route_rows(x, w, prefix, layer, cfg, plan, token_bits, price, widths)
    if width_hist is not None:
        width_hist += torch.bincount(bits_tk.reshape(-1), minlength=width_hist.numel())
    if row_hist is not None:  # [N, 16] per row: chosen experts at each width (0: skipped)
        row_hist.scatter_add_(1, bits_tk, torch.ones_like(bits_tk))
    d = plan.decode_rows
    out = grouped_experts(x.float(), routing, bits_tk, layer, cfg, provider, expert_runner(w, prefix, cfg), d,
                          [s.row for s in plan.segments[d:]])
    return add_dense_parts(out, x, routing.idx, w, prefix, cfg, plan.linear).to(x.dtype)


@torch.inference_mode()
def ragged_forward(decoder: MoEDecoder, tokens: torch.Tensor, plan: StepPlan, pool: KVPool,
                   token_bits: torch.Tensor, price: torch.Tensor | None, logit_rows: list[tuple[int, int]],
                   padded_attention: bool = False, row_hist: torch.Tensor | None = None) -> torch.Tensor:
    """tokens [N] (rows as `plan` lays them out), token_bits [N], price [N] (NaN: fixed width) or None ->
    logits [M, V] for the rows in `logit_rows` (one (first, end) range per segment, in order). Advances the
    slots' lengths in `pool`. `row_hist` [N, 16], if given, counts each row's experts per width.
    The layer loop is `MoEDecoder.run`'s with B = 1 and T = N rows."""
    cfg, w = decoder.cfg, decoder.w
    N = tokens.shape[0]
    positions, slots = plan.positions(), plan.slots()
    if int(positions.max()) >= pool.max_len:
        raise ValueError(f"a sequence exceeds the KV cache ({pool.max_len} positions)")
    attention = ragged_mla_attention if cfg.attention == "mla" else ragged_attention
    h = decoder.embed(tokens[None])  # [1, N, H] fp32
    prefetch = decoder.prefetch and plan.decode_rows == N <= PREFETCH_MAX_ROWS
    for L in range(cfg.num_layers):
        p = f"layers.{L}."
        a = attention(block_input(h, w, p + "attn_norm", cfg), w, p, cfg, decoder.rope, pool, L, plan, positions,
                      slots, padded_attention)
        h = h + block_output(a, w, p + "attn_norm", cfg)
        x = block_input(h, w, p + "ffn_norm", cfg)
        if L in cfg.dense_layers:
            y = swiglu(x, w[p + "ffn.w1"], w[p + "ffn.w3"], w[p + "ffn.w2"], plan.linear)
            h = h + block_output(y, w, p + "ffn_norm", cfg)
            continue
        nxt = decoder.next_moe.get(L)
        if prefetch and nxt is not None and decoder.provider.wants_prefetch(nxt, int(token_bits.max())):
            # I/O only (never changes a result): the next MoE layer's guess on this residual stream
            q = f"layers.{nxt}."
            guess_x = block_input(h, w, q + "ffn_norm", cfg)[0]
            guess = guess_layer(guess_x, w, q, cfg)
            bits_tk = chosen_widths(nxt, guess_x, guess, token_bits, price, decoder.widths)
            decoder.provider.prefetch(nxt, predict_demands(guess, bits_tk))
        y = ragged_moe(x[0], w, p, L, cfg, decoder.provider, plan, token_bits, price, decoder.widths,
                       decoder.width_hist, row_hist)[None]
        h = h + block_output(y, w, p + "ffn_norm", cfg)
    for s in plan.segments:
        pool.lengths[s.slot] = s.start + s.length
    sel = torch.cat([torch.arange(a, e) for a, e in logit_rows]) if logit_rows else torch.zeros(0, dtype=torch.long)
    if sel.numel() == 0:
        return torch.zeros(0, cfg.vocab_size)
    return decoder.head(h[0, sel], plan.select(logit_rows).linear)
