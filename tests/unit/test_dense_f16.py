"""d2moe's fp16 dense kernel (quant/kernels/mwq_f16_dense.h) against the exact product, its batch invariance
(each row's bits the same whatever rows share the call: ragged batching relies on it) and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from d2moe.models.dense import float16_linear, float16_linear_reference
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
