"""Dense matrices' products: int8 (quantized once at conversion, multiplied without a float copy) and fp16.

Dense weights (embeddings, attention, head, dense FFN layers) are resident and count against the memory
budget, so `convert --dense-dtype int8` (the default) stores each such matrix W [out, in] as symmetric int8
with a scale per row and 64 columns, Q8_0's layout (one scale per row where `in` is not a multiple of 64):

    W ~= q * scale     q int8 in [-127, 127], scale bfloat16 (> 0) [out, in / 64] (or [out])

On disk (dense.safetensors) that is two tensors, `name` (int8 [out, in]) and `name.scale` (bfloat16). The
scale is rounded to bfloat16 before the weights are quantized, so the only error is the rounding of q (at
most half a step per weight). One scale per row cost the default model +1.8 % perplexity; per 64 columns it
is within noise of fp16 (4,096 held-out Hamlet tokens: 55.95 against 56.24).

Runtime, grouped int8: at load each attention, dense-FFN, head and embedding matrix is rearranged in its own
memory as `Int8Blocks` (`block_dense_matrices`), and `int8_blocks_linear` multiplies it with activations
quantized to int8 per token and 64 columns (llama.cpp's Q8_0 x Q8_0) by VNNI byte multiply-adds
(quant/kernels/mwq_q8_dense.h): the default model's 49K x 576 head on one core, 16 tokens 8.4 -> 3.0 ms
against fp16 blocks, one token 2.1 -> 1.1 ms; a token gets the same bits at any token count.
`int8_blocks_linear_reference` is its definition. Per-row int8 (older stores): `int8_linear` streams q
through d2moe's VNNI kernel on int16 activations for a few tokens (`_weight_int8pack_mm` the fallback) and
dequantizes cache-sized chunks for bf16 GEMMs beyond; `int8_linear_reference` is the plain fp32 definition.

fp16 matrices: `dense_f16.py`. `block_dense_matrices` blocks both kinds at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from d2moe.models.dense_f16 import (
    BLOCK_ROWS,
    Float16Blocks,
    block_float16_in_place,
    contiguous_f32,
    unblock_float16,
)
from d2moe.quant.kernels.cpu import load_kernel

# last name part; MLA's wkv_b stays float: it is used per head as a batched matmul (models/mla.py)
INT8_MATRICES = frozenset({"embed", "lm_head", "wq", "wk", "wv", "wo", "w1", "w3", "w2", "wq_a", "wq_b", "wkv_a"})
SCALE_SUFFIX = ".scale"
SCALE_DTYPE = torch.bfloat16  # the kernel's scale dtype; the scale is chosen exactly representable in it
QMAX = 127  # symmetric: -128 is never used
GROUP = 64  # columns per scale of `quantize_int8` (and of the int8 blocks' activations)
KERNEL_MAX_TOKENS = 31  # up to this many rows: the int8 GEMV kernel (linear in rows); more: dequantize + GEMM
KERNEL_K_MULTIPLE = 16  # the AVX-512 kernel reads 16 columns at a time with aligned loads and has no tail
DEQUANT_CHUNK = 1 << 20  # weights per dequantized bf16 chunk (2 MiB: stays in cache, no fresh pages)
_ALIGN = 64  # bytes; the kernel's loads need 32-byte aligned activations and 16-byte aligned rows


@dataclass(frozen=True, eq=False)
class Int8Matrix:
    """W ~= q * scale; q int8 [out, in], scale bfloat16 [out] (per row) or [out, in / GROUP] (per row and
    GROUP columns)."""

    q: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    @property
    def grouped(self) -> bool:
        """A scale per row and GROUP columns (else one per row)."""
        return self.scale.dim() == 2

    def rows(self, start: int, stop: int) -> Int8Matrix:
        """Rows [start, stop) as views (no copy)."""
        return Int8Matrix(self.q[start:stop], self.scale[start:stop])


@dataclass(frozen=True, eq=False)
class Int8Blocks:
    """An int8 matrix [rows, in] held for the VNNI kernel (quant/kernels/mwq_q8_dense.h): blocks of 16 rows,
    each 4 columns of the 16 rows one 64-byte run, [ceil(rows/16), in/4, 16, 4] uint8 holding weight + 128
    (the unsigned operand of a byte multiply-add); scales bf16 [ceil(rows/16), in/64, 16], one per row and 64
    columns (the stored scales rearranged: loading holds the bytes the file does). Activations are quantized
    to int8 per 64 columns (Q8_0 x Q8_0, as llama.cpp multiplies): 2.4x the fp16 blocks' speed from a few
    tokens on, half their bytes. Made at load from an `Int8Matrix`
    (`block_int8_in_place`, in its own memory); an embedding reads rows out of it (`int8_blocked_rows`)."""

    blocks: torch.Tensor
    scales: torch.Tensor
    n_rows: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n_rows, self.blocks.shape[1] * 4))

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8

    def rows(self, start: int, stop: int) -> Int8Blocks:
        """Rows [start, stop) as a view; start a multiple of 16, stop too unless it is the end."""
        if start % BLOCK_ROWS or (stop % BLOCK_ROWS and stop != self.n_rows):
            raise ValueError(f"rows {start}:{stop} do not fall on {BLOCK_ROWS}-row blocks")
        sl = slice(start // BLOCK_ROWS, -(-stop // BLOCK_ROWS))
        return Int8Blocks(self.blocks[sl], self.scales[sl], stop - start)


DenseWeight = torch.Tensor | Int8Matrix | Float16Blocks | Int8Blocks
BLOCKED_MATRICES = frozenset({"wqkv", "wq", "wk", "wv", "wo", "w1", "w2", "w3"})  # in each layer
BLOCKED_TOP = frozenset({"embed", "lm_head"})  # the head (and the embedding, often the same matrix)


def wants_int8(name: str, t: torch.Tensor) -> bool:
    """Whether `convert --dense-dtype int8` quantizes this canonical tensor: matrices the runtime reads only
    through `linear` / `embedding`. Routers, shared-expert gates and absent-expert vectors stay float:
    they are tiny and decide or add to the residual stream directly."""
    return t.dim() == 2 and name.rsplit(".", 1)[-1] in INT8_MATRICES


# ---- quantization (pure) ----------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor, group: int = GROUP) -> Int8Matrix:
    """Symmetric int8 with one scale per row and `group` columns (Q8_0's layout: +1.8 % perplexity on the
    default model with one scale per row, within noise per 64 columns), or per row (`group` 0, or a width
    not divisible by it). The scale is max|w| / 127 rounded to bf16 first (relative error <= 2^-8), so
    |w / scale| < 127.5 and rounding q never clips: every weight is within half a step. All-zero groups get
    scale 1 and q 0."""
    w = w.float()
    out, n_in = w.shape
    grouped = bool(group) and n_in % group == 0
    g = group if grouped else n_in
    absmax = w.view(out, n_in // g, g).abs().amax(dim=2)  # [out, groups]
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax)).to(SCALE_DTYPE)
    scale = torch.where(scale.float() > 0, scale, torch.full_like(scale, torch.finfo(SCALE_DTYPE).tiny))
    q = torch.round(w.view(out, n_in // g, g) / scale.float()[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return Int8Matrix(q.view(out, n_in), scale if grouped else scale[:, 0].contiguous())


def column_scales(m: Int8Matrix) -> torch.Tensor:
    """m's scale per weight's column group as fp32 [out, in] (a per-row scale repeated along its row)."""
    s = m.scale.float()
    return s[:, None].expand(m.q.shape) if s.dim() == 1 else s.repeat_interleave(m.q.shape[1] // s.shape[1], dim=1)


def dequantize_int8(m: Int8Matrix) -> torch.Tensor:
    """The fp32 matrix m stands for (exact: q and the bf16 scale are both exact in fp32)."""
    return m.q.float() * column_scales(m)


# ---- matmul: fast path and reference ----------------------------------------------------------------------


def int8_linear_reference(x: torch.Tensor, m: Int8Matrix) -> torch.Tensor:
    """x [..., in] -> x @ W.T [..., out] in fp32 (the definition the fast path is tested against)."""
    return x.float() @ dequantize_int8(m).T


def _aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % _ALIGN == 0 else t.clone()


def kernel_fits(m: Int8Matrix) -> bool:
    """`_weight_int8pack_mm` reads q in blocks of 16 columns with aligned loads and no tail (odd widths read
    past the row and crash or return garbage), so it only takes contiguous, aligned q with in % 16 == 0."""
    q = m.q
    return q.shape[1] % KERNEL_K_MULTIPLE == 0 and q.is_contiguous() and q.data_ptr() % 16 == 0


def int8_linear(x: torch.Tensor, m: Int8Matrix) -> torch.Tensor:
    """x [..., in] float -> [..., out] fp32. Few rows: d2moe's int8 kernel on int16 activations (2-3x torch's
    below, and ~100x more exact; in % 64 == 0 and AVX-512 VNNI), else torch's int8 GEMV kernel on bf16
    activations (cost grows with rows, weights read once per 4 rows). Both give a row the same bits at any
    row count up to KERNEL_MAX_TOKENS. Many rows: dequantize chunks of rows to bf16 (small chunks reuse
    cached memory; one fresh full-size copy costs more in page faults than the GEMM) and run bf16 GEMMs,
    scaling the fp32 result per output column."""
    lead, K = x.shape[:-1], x.shape[-1]
    N = m.q.shape[0]
    x2 = x.reshape(-1, K)
    if m.grouped:  # no per-row kernel: chunks dequantized to fp32 (matrices not held as Int8Blocks; rare)
        out = torch.empty(x2.shape[0], N, dtype=torch.float32)
        rows = max(1, DEQUANT_CHUNK // K)
        for a in range(0, N, rows):
            torch.matmul(contiguous_f32(x2), dequantize_int8(m.rows(a, min(a + rows, N))).T, out=out[:, a:a + rows])
        return out.view(*lead, N)
    if x2.shape[0] <= KERNEL_MAX_TOKENS and (kernel := load_kernel()) is not None and m.q.is_contiguous():
        y = kernel.int8_linear(contiguous_f32(x2), m.q, m.scale)
        if y is not None:  # d2moe's VNNI kernel on int16 activations (quant/kernels/mwq_int8_dense.h)
            return y.view(*lead, N)
    if x2.shape[0] <= KERNEL_MAX_TOKENS and kernel_fits(m):
        xb = _aligned(x2.to(torch.bfloat16))
        y = torch.ops.aten._weight_int8pack_mm(xb, m.q, m.scale).float()
        return y.view(*lead, N)
    xb = x2.to(torch.bfloat16)
    scale = m.scale.float()  # so the product below is computed (not just stored) in fp32
    out = torch.empty(x2.shape[0], N, dtype=torch.float32)
    rows = max(1, DEQUANT_CHUNK // K)
    for a in range(0, N, rows):
        b = min(a + rows, N)
        torch.mul(F.linear(xb, m.q[a:b].to(torch.bfloat16)), scale[a:b], out=out[:, a:b])
    return out.view(*lead, N)


# ---- int8 blocks: Q8_0 x Q8_0 ---------------------------------------------------------------------------------

UNSIGNED_OFFSET = 128  # blocks hold weight + 128 (the unsigned operand of VNNI's u8 x s8 multiply-add)


def block_int8_in_place(m: Int8Matrix) -> Int8Blocks:
    """The blocks of a grouped m (contiguous q, rows % 16 == 0, a scale per 64 columns) in q's own memory (q
    is overwritten), and its scales rearranged alike. Per-row int8 stays an `Int8Matrix` (its own kernel)."""
    q = m.q
    rows, n_in = q.shape
    if rows % BLOCK_ROWS or n_in % GROUP or not q.is_contiguous() or not m.grouped:
        raise ValueError(f"int8 blocks need contiguous rows in multiples of {BLOCK_ROWS} with a scale per {GROUP} "
                         f"columns, not {tuple(q.shape)} with scales {tuple(m.scale.shape)}")
    nb = rows // BLOCK_ROWS
    scales = m.scale.to(SCALE_DTYPE).reshape(nb, BLOCK_ROWS, n_in // GROUP).transpose(1, 2).contiguous()
    tmp = q.view(nb, BLOCK_ROWS, n_in // 4, 4).transpose(1, 2).contiguous()
    q.copy_(tmp.view(rows, n_in))
    del tmp
    u = q.view(torch.uint8)
    u.bitwise_xor_(0x80)  # two's complement + 128 = flipping the sign bit
    return Int8Blocks(u.view(nb, n_in // 4, BLOCK_ROWS, 4), scales, rows)


def unblock_int8(b: Int8Blocks) -> Int8Matrix:
    """The int8 matrix the blocks hold, with its scale per 64 columns (copies)."""
    nb, quads = b.blocks.shape[:2]
    q = (b.blocks.to(torch.int16) - UNSIGNED_OFFSET).to(torch.int8).transpose(1, 2).reshape(nb * BLOCK_ROWS, quads * 4)
    scale = b.scales.transpose(1, 2).reshape(nb * BLOCK_ROWS, -1)
    return Int8Matrix(q[: b.n_rows].contiguous(), scale[: b.n_rows].contiguous())


def quantize_activations_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (int8 values as fp32 [T, K], scale fp32 [T, K/64]): per token and 64 columns, the kernel's
    rule (round to nearest even of x * (127 / amax); amax 0 gives zeros and scale 0)."""
    T, K = x.shape
    xg = x.float().reshape(T, K // GROUP, GROUP)
    amax = xg.abs().amax(dim=2)
    ok = (amax > 0) & amax.isfinite()
    inv = torch.where(ok, 127.0 / torch.where(ok, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    q = torch.round(xg * inv[..., None]).clamp_(-QMAX, QMAX)
    scale = torch.where(amax.isfinite(), amax / 127.0, torch.full_like(amax, float("nan")))
    return q.reshape(T, K), scale


def int8_blocks_linear(x: torch.Tensor, b: Int8Blocks) -> torch.Tensor:
    """x [..., in] float -> x @ W.T [..., rows] fp32: d2moe's VNNI kernel on int8 activations (the same bits for
    a row at any row count), or the reference where this build has none."""
    lead, K = x.shape[:-1], x.shape[-1]
    if (kernel := load_kernel()) is not None:
        y = kernel.q8_blocks_linear(contiguous_f32(x.reshape(-1, K)), b.blocks, b.scales, b.n_rows)
        if y is not None:
            return y.view(*lead, b.n_rows)
    return int8_blocks_linear_reference(x.reshape(-1, K), b).view(*lead, b.n_rows)


def int8_blocks_linear_reference(x: torch.Tensor, b: Int8Blocks) -> torch.Tensor:
    """x [T, in] -> [T, rows]: the definition the kernel is tested against. Per 64 columns the int8 products
    are summed exactly, then scaled by weight scale x activation scale and summed over groups in order."""
    m = unblock_int8(b)
    xq, sx = quantize_activations_q8(x)
    T, K = xq.shape
    G = K // GROUP
    acc = torch.einsum("tgj,ngj->tng", xq.double().view(T, G, GROUP), m.q.double().view(-1, G, GROUP)).float()
    y = torch.zeros(T, m.q.shape[0], dtype=torch.float32)
    for g in range(G):
        y = y + acc[:, :, g] * (m.scale[None, :, g].float() * sx[:, g, None])
    return y


def int8_blocked_rows(tokens: torch.Tensor, b: Int8Blocks) -> torch.Tensor:
    """tokens [...] -> rows of the blocked matrix [..., in] fp32 (row r is lane r % 16 of block r // 16)."""
    blk, lane = tokens // BLOCK_ROWS, tokens % BLOCK_ROWS
    q = b.blocks[blk, :, lane, :].flatten(-2).to(torch.int16) - UNSIGNED_OFFSET  # [..., in]
    return q.float() * b.scales[blk, :, lane].float().repeat_interleave(GROUP, dim=-1)


def _blockable(w: DenseWeight) -> bool:
    if isinstance(w, Int8Matrix):
        return w.grouped and w.q.shape[0] % BLOCK_ROWS == 0 and w.q.shape[1] % GROUP == 0 and w.q.is_contiguous()
    return (isinstance(w, torch.Tensor) and w.dtype == torch.float16 and w.dim() == 2 and w.shape[1] % 2 == 0
            and w.shape[0] % BLOCK_ROWS == 0 and w.is_contiguous())


def _block_in_place(w: torch.Tensor | Int8Matrix) -> Float16Blocks | Int8Blocks:
    return block_int8_in_place(w) if isinstance(w, Int8Matrix) else block_float16_in_place(w)


def block_dense_matrices(dense: dict[str, DenseWeight]) -> dict[str, DenseWeight]:
    """`dense` (changed in place and returned) with each layer's fp16 or int8 attention and dense-FFN matrices
    as blocks in their own memory (`Float16Blocks`, `Int8Blocks`; the fused q|k|v once, its q, k, v views of
    it where they fall on 16-row blocks; matrices whose rows are not a multiple of 16 are left), and the head
    and embedding (a 16-row step through the default model's 49K-row head: fp16 16.0 -> 8.6 ms on one core).
    Routers and anything else keep their rows."""
    for name in list(dense):
        w = dense[name]
        last = name.rsplit(".", 1)[-1]
        if not (name in BLOCKED_TOP or (name.startswith("layers.") and last in BLOCKED_MATRICES)) or not _blockable(w):
            continue
        p = name[: -len(last)]
        if last in ("wq", "wk", "wv") and isinstance(dense.get(p + "wqkv"), torch.Tensor | Int8Matrix):
            continue  # views of the fused matrix: done with it below
        if last != "wqkv":
            dense[name] = _block_in_place(w)
            continue
        ends = torch.tensor([dense[p + n].shape[0] for n in ("wq", "wk", "wv")]).cumsum(0).tolist()  # fuse_qkv's
        if any(e % BLOCK_ROWS for e in ends[:2]):
            continue  # q|k|v not on block boundaries: the layer keeps its rows (views share them)
        dense[name] = fused = _block_in_place(w)
        for n, lo, hi in zip(("wq", "wk", "wv"), [0, *ends[:2]], ends):
            dense[p + n] = fused.rows(lo, hi)
    return dense


def as_float(w: DenseWeight) -> torch.Tensor:
    """The fp32 matrix (or tensor) any dense weight stands for (a copy where it is not fp32)."""
    if isinstance(w, Int8Blocks):
        w = unblock_int8(w)
    if isinstance(w, Int8Matrix):
        return dequantize_int8(w)
    if isinstance(w, Float16Blocks):
        return unblock_float16(w).float()
    return w.float()


# ---- embedding ----------------------------------------------------------------------------------------------


def int8_embedding(tokens: torch.Tensor, m: Int8Matrix) -> torch.Tensor:
    """tokens [...] -> rows of W [..., H] fp32 (reads only the chosen rows)."""
    rows = F.embedding(tokens, m.q).float()
    if m.grouped:
        return rows * m.scale[tokens].float().repeat_interleave(m.q.shape[1] // m.scale.shape[1], dim=-1)
    return rows * m.scale[tokens].float().unsqueeze(-1)


def int8_embedding_reference(tokens: torch.Tensor, m: Int8Matrix) -> torch.Tensor:
    return dequantize_int8(m)[tokens]


# ---- storage ------------------------------------------------------------------------------------------------


def to_stored(tensors: dict[str, DenseWeight]) -> dict[str, torch.Tensor]:
    """Flatten for safetensors: an Int8Matrix `name` becomes `name` (int8) and `name.scale`."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if isinstance(t, Int8Matrix):
            out[name], out[name + SCALE_SUFFIX] = t.q, t.scale
        else:
            out[name] = t
    return out


def from_stored(flat: dict[str, torch.Tensor]) -> dict[str, DenseWeight]:
    """Inverse of `to_stored`: pair each int8 tensor with its `.scale` (aligned for the kernel)."""
    out: dict[str, DenseWeight] = {}
    for name, t in flat.items():
        if t.dtype == torch.int8:
            scale = flat.get(name + SCALE_SUFFIX)
            grouped = (t.shape[0], t.shape[1] // GROUP) if t.shape[1] % GROUP == 0 else None
            if scale is None or scale.shape not in ((t.shape[0],), grouped):
                raise ValueError(f"int8 dense tensor {name} {tuple(t.shape)} has no matching {name}{SCALE_SUFFIX}")
            # per-row q is aligned for its kernel; grouped q is rewritten in place as blocks (no copy)
            out[name] = Int8Matrix(t if scale.dim() == 2 else _aligned(t), scale.to(SCALE_DTYPE).contiguous())
        elif not _is_scale_of_int8(name, flat):
            out[name] = t
    return out


def _is_scale_of_int8(name: str, flat: dict[str, torch.Tensor]) -> bool:
    base = flat.get(name.removesuffix(SCALE_SUFFIX)) if name.endswith(SCALE_SUFFIX) else None
    return base is not None and base.dtype == torch.int8


def load_dense(path: Path | str, fuse: bool = True) -> dict[str, DenseWeight]:
    """dense.safetensors -> canonical name -> tensor or Int8Matrix, with q|k|v fused (`fuse_qkv`) unless
    `fuse` is False. Float stores load as they are stored."""
    dense = from_stored(load_file(str(path)))
    return fuse_qkv(dense) if fuse else dense


def dense_nbytes(dense: dict[str, DenseWeight]) -> int:
    """Bytes the dense weights hold (int8 plus scales; views into one another counted once)."""
    seen: dict[int, int] = {}
    for t in dense.values():
        parts = ((t.q, t.scale) if isinstance(t, Int8Matrix) else (t.blocks, t.scales) if isinstance(t, Int8Blocks)
                 else (t.blocks,) if isinstance(t, Float16Blocks) else (t,))
        for part in parts:
            storage = part.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def fuse_qkv(dense: dict[str, DenseWeight]) -> dict[str, DenseWeight]:
    """A copy of `dense` with `layers.L.wqkv` (and `bqkv`): the rows of wq|wk|wv in one matrix, so attention
    runs one matmul per layer instead of three (int8, T = 1: 19 us against 34 us). wq/wk/wv (bq/bk/bv)
    become row views of it, so no bytes are added. Layers whose three matrices differ in kind are left."""
    out = dict(dense)
    for name in dense:
        if not name.endswith(".wq"):
            continue
        p = name[: -len("wq")]
        ws = [dense.get(p + n) for n in ("wq", "wk", "wv")]
        bs = [dense.get(p + n) for n in ("bq", "bk", "bv")]
        if any(w is None for w in ws) or (any(b is None for b in bs) and any(b is not None for b in bs)):
            continue
        if all(isinstance(w, Int8Matrix) for w in ws):
            fused: DenseWeight = Int8Matrix(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]))
        elif all(isinstance(w, torch.Tensor) and w.dtype == ws[0].dtype for w in ws):
            fused = torch.cat(ws)
        else:
            continue
        out[p + "wqkv"] = fused
        bias = torch.cat(bs) if bs[0] is not None else None
        if bias is not None:
            out[p + "bqkv"] = bias
        a = 0
        for i, (wn, bn) in enumerate((("wq", "bq"), ("wk", "bk"), ("wv", "bv"))):
            b = a + ws[i].shape[0]
            out[p + wn] = fused.rows(a, b) if isinstance(fused, Int8Matrix) else fused[a:b]
            if bias is not None:
                out[p + bn] = bias[a:b]
            a = b
    return out
