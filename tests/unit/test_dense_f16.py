"""d2moe's fp16 dense kernel (quant/kernels/mwq_f16_dense.h) against the exact product, its batch invariance
(each row's bits the same whatever rows share the call: ragged batching relies on it) and its fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from d2moe.models.dense import block_dense_matrices, dense_nbytes, fuse_qkv
from d2moe.models.dense_f16 import (
    Float16Blocks,
    block_float16,
    float16_blocks_linear,
    float16_blocks_linear_reference,
    float16_linear,
    float16_linear_reference,
    unblock_float16,
)
from d2moe.models.layers import linear
from d2moe.quant.kernels import load_kernel


def _kernel():
    kernel = load_kernel()
    if kernel is None or kernel.f16_linear(torch.zeros(1, 16), torch.zeros(4, 16, dtype=torch.float16)) is None:
        pytest.skip("no AVX-512 kernel on this machine: torch's fp16 product serves fp16 matrices")
    return kernel


@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1538, 64), (7, 48), (3, 16)])
def test_f16_kernel_is_exact_and_batch_invariant(shape):
    """fp32 products of the exactly converted fp16 weights: within fp32 summation error of the float64
    product (torch's fp16 path, activations rounded to fp16, is ~1e3 times further); and a row's bits are
    the same alone, in token tiles of 4, in blocks of 64 tokens, and with any neighbours."""
    kernel = _kernel()
    out, inp = shape
    g = torch.Generator().manual_seed(out + inp)
    w = (torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)).half()
    x = torch.randn(131, inp, generator=g) * 3
    y = kernel.f16_linear(x, w)
    exact = x.double() @ w.double().T
    scale = x.abs().double() @ w.abs().double().T
    assert bool(((y.double() - exact).abs() <= inp * 2**-23 * scale + 1e-30).all())
    torch_err = (float16_linear_reference(x, w).double() - exact).abs().max()
    assert (y.double() - exact).abs().max() * 100 < torch_err
    for rows in (1, 2, 3, 4, 5, 17, 64, 65):  # one row at a time below 4 tokens, tiles of 4, blocks of 64
        assert torch.equal(kernel.f16_linear(x[:rows].contiguous(), w), y[:rows])
    for a in (7, 66, 130):
        assert torch.equal(kernel.f16_linear(x[a : a + 1].contiguous(), w), y[a : a + 1])


def test_float16_linear_falls_back_where_the_kernel_has_no_shape():
    """in % 16 != 0 or a strided matrix: torch's fp16 product, the same as the reference; with a bias
    and leading dims through layers.linear."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g).half()
    x = torch.randn(2, 3, 40, generator=g)
    assert torch.equal(float16_linear(x, w), float16_linear_reference(x, w))
    wt = torch.randn(64, 32, generator=g).half().T  # [32, 64], not contiguous
    xt = torch.randn(5, 64, generator=g)
    assert torch.equal(float16_linear(xt, wt), float16_linear_reference(xt, wt))
    w2, b = torch.randn(24, 64, generator=g).half(), torch.randn(24, generator=g)
    x2 = torch.randn(2, 3, 64, generator=g)
    y = linear(x2, w2, b)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    torch.testing.assert_close(y, (x2.double() @ w2.double().T + b.double()).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (40, 64), (7, 48), (16, 2)])
def test_f16_blocks_kernel_is_exact_and_batch_invariant(shape):
    """The blocked layout (models/dense_f16.py `Float16Blocks`, 16 rows side by side per column): within fp32
    summation error of the float64 product, rows past a partial last block never written, and a row's bits
    the same alone, in tiles of 8, 4 or 1 tokens, and with any neighbours."""
    _kernel()  # skips without the AVX-512 kernel
    out, inp = shape
    g = torch.Generator().manual_seed(out * 7 + inp)
    w = (torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)).half()
    b = block_float16(w)
    assert b.shape == (out, inp) and torch.equal(unblock_float16(b), w)
    x = torch.randn(37, inp, generator=g) * 3
    y = float16_blocks_linear(x, b)
    exact = x.double() @ w.double().T
    scale = x.abs().double() @ w.abs().double().T
    assert y.shape == (37, out)
    assert bool(((y.double() - exact).abs() <= inp * 2**-23 * scale + 1e-30).all())
    ref = float16_blocks_linear_reference(x, b).double()
    assert bool(((y.double() - ref).abs() <= 2 * inp * 2**-23 * scale + 1e-30).all())
    for rows in (1, 3, 4, 8, 9, 13):
        assert torch.equal(float16_blocks_linear(x[:rows], b), y[:rows])
    for a in (5, 20, 36):
        assert torch.equal(float16_blocks_linear(x[a : a + 1], b), y[a : a + 1])
    assert torch.equal(linear(x, b), y)


def test_loaded_layers_hold_blocks_that_share_the_fused_qkv():
    """At load, each layer's fp16 q|k|v (fused, with q, k, v as views of it), o and dense FFN matrices become
    blocks in the memory their rows took; the embedding keeps its rows; no bytes are added; a layer whose
    q|k|v split is not on 16-row blocks keeps its rows too."""
    g = torch.Generator().manual_seed(3)

    def h(*s):
        return torch.randn(*s, generator=g).half()

    dense = fuse_qkv({"embed": h(50, 64), "layers.0.wq": h(64, 64), "layers.0.wk": h(32, 64),
                      "layers.0.wv": h(32, 64), "layers.0.wo": h(64, 64), "layers.0.ffn.w1": h(96, 64),
                      "layers.1.wq": h(24, 64), "layers.1.wk": h(8, 64), "layers.1.wv": h(8, 64),
                      "layers.0.router": h(4, 64)})
    before = {k: v.clone() for k, v in dense.items()}
    nbytes, where = dense_nbytes(dense), {k: v.data_ptr() for k, v in dense.items()}
    out = block_dense_matrices(dense)
    assert isinstance(out["layers.0.wqkv"], Float16Blocks) and isinstance(out["layers.0.wo"], Float16Blocks)
    assert isinstance(out["layers.0.ffn.w1"], Float16Blocks)
    for n in ("wq", "wk", "wv"):
        assert out[f"layers.0.{n}"].blocks.data_ptr() >= out["layers.0.wqkv"].blocks.data_ptr()
        assert torch.equal(unblock_float16(out[f"layers.0.{n}"]), before[f"layers.0.{n}"])
    for n in ("embed", "layers.0.router", "layers.1.wqkv", "layers.1.wq"):
        assert isinstance(out[n], torch.Tensor) and torch.equal(out[n], before[n])
    assert dense_nbytes(out) == nbytes
    for n in ("layers.0.wqkv", "layers.0.wo", "layers.0.ffn.w1"):  # in the memory the rows took
        assert out[n].blocks.data_ptr() == where[n] and torch.equal(unblock_float16(out[n]), before[n])


def test_a_blocked_embedding_reads_its_rows_and_serves_as_the_tied_head():
    """The fp16 embedding (a tied head) is blocked in place too: a token's row comes out of its block exactly,
    and the head product is the blocked kernel's."""
    from d2moe.models.layers import embedding

    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(5)).half()
    rows = w.clone()
    out = block_dense_matrices({"embed": w})["embed"]
    assert isinstance(out, Float16Blocks) and out.blocks.data_ptr() == w.data_ptr()
    tokens = torch.tensor([[0, 15, 16, 95], [17, 17, 3, 80]])
    assert torch.equal(embedding(tokens, out), F.embedding(tokens, rows).float())
    x = torch.randn(5, 64)
    assert torch.allclose(linear(x, out), x @ rows.float().T, rtol=1e-5, atol=1e-5)
