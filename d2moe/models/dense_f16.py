"""Dense fp16 matrices' products and their blocked layout (the int8 ones and the load-time dispatch: dense.py).

fp16 matrices (`convert --dense-dtype float16`) go through d2moe's fp16 kernel
(quant/kernels/mwq_f16_dense.h): torch's CPU fp16 GEMM rounds activations to fp16 and costs time linear in
rows (the default model's head: 3.3 ms for one row, 48 ms for 16, 380 ms for 128); the kernel keeps them
fp32 (~2000x more exact), streams the weights once and costs 2.0 / 17 / 107 ms. `F.linear` in the matrix's
dtype is the fallback (no AVX-512, in % 16 != 0) and the reference. A layer's fp16 q|k|v, o and dense FFN
matrices are held from load as `Float16Blocks` (16 rows side by side per column; `block_dense_matrices`):
one load per column for 16 rows and one broadcast per activation, no horizontal sums; the 960 x 576 fused
q|k|v at 16 tokens 0.22 -> 0.16 ms, at one token 0.031 -> 0.024 ms (one core). The fp16 head and embedding
too: the embedding reads a token's row out of its block (`blocked_rows`), so a tied head needs no copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.quant.kernels.cpu import load_kernel

BLOCK_ROWS = 16  # rows side by side in a block (fp16 and int8 blocks alike)


@dataclass(frozen=True, eq=False)
class Float16Blocks:
    """An fp16 matrix [rows, in] held for the kernel as blocks of 16 rows side by side, [ceil(rows/16), in, 16]
    (rows past the end zero): a column's 16 weights are one load and a token's activation one broadcast, so
    products of a few or many tokens need no horizontal sums (quant/kernels/mwq_f16_dense.h `f16_block`:
    ~1.3-1.5x the row-major kernel from 4 tokens on, the same at one). Made at load (`block_dense_matrices`);
    an embedding reads its rows out of the blocks (`blocked_rows`), so a tied head needs no second copy."""

    blocks: torch.Tensor
    n_rows: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.n_rows, self.blocks.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    def rows(self, start: int, stop: int) -> Float16Blocks:
        """Rows [start, stop) as a view; start a multiple of 16, stop too unless it is the end."""
        if start % BLOCK_ROWS or (stop % BLOCK_ROWS and stop != self.n_rows):
            raise ValueError(f"rows {start}:{stop} do not fall on {BLOCK_ROWS}-row blocks")
        return Float16Blocks(self.blocks[start // BLOCK_ROWS : -(-stop // BLOCK_ROWS)], stop - start)


def contiguous_f32(x: torch.Tensor) -> torch.Tensor:
    x = x if x.dtype == torch.float32 else x.float()
    return x if x.is_contiguous() else x.contiguous()


def float16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., in] float -> x @ w.T [..., out] fp32 for an fp16 w [out, in]: d2moe's kernel (fp32
    activations, the same bits for a row at any row count), or torch's fp16 GEMM where it has none."""
    lead, K = x.shape[:-1], x.shape[-1]
    if w.is_contiguous() and (kernel := load_kernel()) is not None:
        y = kernel.f16_linear(contiguous_f32(x.reshape(-1, K)), w)
        if y is not None:
            return y.view(*lead, w.shape[0])
    return float16_linear_reference(x, w)


def float16_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """torch's fp16 product (activations rounded to fp16), fp32 out."""
    return F.linear(x.to(w.dtype), w).float()


def block_float16(w: torch.Tensor) -> Float16Blocks:
    """fp16 [rows, in] -> its blocks in new memory, any row count (the last block padded with zero rows)."""
    rows, n_in = w.shape
    padded = torch.zeros(-(-rows // BLOCK_ROWS) * BLOCK_ROWS, n_in, dtype=w.dtype)
    padded[:rows] = w
    return Float16Blocks(block_float16_in_place(padded).blocks, rows)


def block_float16_in_place(w: torch.Tensor) -> Float16Blocks:
    """The blocks of a contiguous fp16 w [rows, in] with rows % 16 == 0, in w's own memory (w is overwritten:
    block b occupies the same 16 x in values as its rows did). One matrix-sized temporary, freed at once: a
    copy per matrix left the freed originals in the heap (+40 MiB peak RSS on the default model)."""
    rows, n_in = w.shape
    if rows % BLOCK_ROWS or not w.is_contiguous():
        raise ValueError(f"in-place blocks need contiguous rows in multiples of {BLOCK_ROWS}, not {tuple(w.shape)}")
    tmp = w.view(rows // BLOCK_ROWS, BLOCK_ROWS, n_in).transpose(1, 2).contiguous()
    w.copy_(tmp.view(rows, n_in))
    del tmp
    return Float16Blocks(w.view(rows // BLOCK_ROWS, n_in, BLOCK_ROWS), rows)


def unblock_float16(b: Float16Blocks) -> torch.Tensor:
    """The fp16 matrix [rows, in] the blocks hold (a copy)."""
    return b.blocks.transpose(1, 2).reshape(-1, b.blocks.shape[1])[: b.n_rows].contiguous()


def float16_blocks_linear(x: torch.Tensor, b: Float16Blocks) -> torch.Tensor:
    """x [..., in] float -> x @ W.T [..., rows] fp32: d2moe's blocked kernel (fp32 activations; the same bits
    for a row at any row count), or the fp32 reference where it has none."""
    lead, K = x.shape[:-1], x.shape[-1]
    if (kernel := load_kernel()) is not None:
        y = kernel.f16_blocks_linear(contiguous_f32(x.reshape(-1, K)), b.blocks, b.n_rows)
        if y is not None:
            return y.view(*lead, b.n_rows)
    return float16_blocks_linear_reference(x, b)


def float16_blocks_linear_reference(x: torch.Tensor, b: Float16Blocks) -> torch.Tensor:
    """The fp32 product with the fp16 weights (exact in fp32), the definition the kernel is tested against."""
    return x.float() @ unblock_float16(b).float().T


def blocked_rows(tokens: torch.Tensor, b: Float16Blocks) -> torch.Tensor:
    """tokens [...] -> rows of the blocked matrix [..., in] fp32 (row r is lane r % 16 of block r // 16)."""
    return b.blocks[tokens // BLOCK_ROWS, :, tokens % BLOCK_ROWS].float()
