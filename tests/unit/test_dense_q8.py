"""Int8 blocks (models/dense.py `Int8Blocks`, quant/kernels/mwq_q8_dense.h): int8 weights per 64 columns times
int8 activations per 64 columns. The kernel against its reference, the reference against the exact product
(a bound from the rounding of the activations), batch invariance, blocking in place and rows read back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.models.dense import (
    GROUP,
    Int8Blocks,
    Int8Matrix,
    block_dense_matrices,
    block_int8_in_place,
    dense_nbytes,
    dequantize_int8,
    fuse_qkv,
    int8_blocked_rows,
    int8_blocks_linear,
    int8_blocks_linear_reference,
    quantize_activations_q8,
    quantize_int8,
    unblock_int8,
)
from d2moe.models.layers import embedding, linear
from d2moe.models.ragged import UNBOUNDED, invariant_rows
from d2moe.quant.kernels import load_kernel


def _matrix(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 0.2


def _blocks(w: torch.Tensor) -> tuple[Int8Blocks, Int8Matrix]:
    m = quantize_int8(w)
    kept = Int8Matrix(m.q.clone(), m.scale.clone())
    return block_int8_in_place(m), kept


def _kernel_blocks(b: Int8Blocks, x: torch.Tensor) -> torch.Tensor:
    kernel = load_kernel()
    y = kernel.q8_blocks_linear(x.contiguous(), b.blocks, b.scales, b.n_rows) if kernel is not None else None
    if y is None:
        pytest.skip("no AVX-512 VNNI kernel on this machine: the reference serves int8 blocks")
    return y


@pytest.mark.parametrize("shape", [(16, 64), (48, 128), (960, 576), (64, 1536)])
def test_kernel_matches_reference_and_is_batch_invariant(shape):
    """The kernel sums the same exact int8 products as the reference; only the fused multiply-add per group
    rounds differently (<= a few ulps of the output's magnitude). A row's bits are the same alone, in tiles of
    8 and 4, and beside any neighbours."""
    out, inp = shape
    b, _ = _blocks(_matrix(out, inp, seed=out))
    x = torch.randn(37, inp, generator=torch.Generator().manual_seed(inp)) * 3
    y = _kernel_blocks(b, x)
    ref = int8_blocks_linear_reference(x, b)
    mag = x.abs() @ dequantize_int8(unblock_int8(b)).abs().T
    assert bool(((y - ref).abs() <= 2**-20 * mag + 1e-30).all())
    for rows in (1, 3, 4, 8, 9, 13, 36):
        assert torch.equal(_kernel_blocks(b, x[:rows]), y[:rows])
    for a in (5, 17, 36):
        assert torch.equal(_kernel_blocks(b, x[a : a + 1]), y[a : a + 1])
    assert torch.equal(int8_blocks_linear(x, b), y)  # the path linear() takes
    assert invariant_rows(b) == UNBOUNDED


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 6), groups=st.integers(1, 4), log_scale=st.floats(-8, 8), seed=st.integers(0, 2**16),
       zero_group=st.booleans())
def test_reference_within_the_activation_rounding_bound(T, groups, log_scale, seed, zero_group):
    """Each activation is within half its group's step (amax / 127 / 2) of its int8 value times the scale,
    so y is within sum_g step_g / 2 * sum_{j in g} |w_j| (+ fp32 rounding) of x @ W^T with the int8 weights."""
    g = torch.Generator().manual_seed(seed)
    inp = groups * GROUP
    x = torch.randn(T, inp, generator=g) * 2.0**log_scale
    if zero_group:
        x[0, :GROUP] = 0.0
    b, m = _blocks(_matrix(32, inp, seed=seed))
    xq, sx = quantize_activations_q8(x)
    assert bool((xq.abs() <= 127).all()) and bool((xq == xq.round()).all())
    assert bool(((xq * sx.repeat_interleave(GROUP, 1) - x).abs() <= sx.repeat_interleave(GROUP, 1) * 0.5001).all())
    w = dequantize_int8(m)
    exact = x.double() @ w.double().T
    bound = (sx.double() / 2) @ w.abs().double().view(32, groups, GROUP).sum(2).T
    y = int8_blocks_linear_reference(x, b).double()
    assert bool(((y - exact).abs() <= bound * 1.001 + 1e-5 * (x.abs().double() @ w.abs().double().T) + 1e-35).all())
    if zero_group:
        assert float(sx[0, 0]) == 0.0


def test_non_finite_activations_propagate():
    b, _ = _blocks(_matrix(32, 128))
    x = torch.randn(3, 128)
    x[1, 70] = float("nan")
    x[2] = 0.0
    for y in (int8_blocks_linear_reference(x, b), int8_blocks_linear(x, b)):
        assert not bool(y[0].isnan().any()) and bool(y[1].isnan().all()) and bool((y[2] == 0).all())


def test_blocks_in_place_round_trip_and_rows():
    """Blocking rewrites q's own memory; unblocking gives q and the scales back exactly; a token's embedding
    row comes out of its block exactly. Rows off the 16-row blocks and per-row scales are refused."""
    m = quantize_int8(_matrix(48, 128, seed=1))
    q, scale, ptr = m.q.clone(), m.scale.clone(), m.q.data_ptr()
    b = block_int8_in_place(m)
    assert b.blocks.data_ptr() == ptr and b.blocks.dtype == torch.uint8
    back = unblock_int8(b)
    assert torch.equal(back.q, q) and torch.equal(back.scale, scale)
    tokens = torch.tensor([[0, 15, 16, 47], [3, 3, 31, 32]])
    w = q.float() * scale.float().repeat_interleave(64, 1)
    assert torch.equal(int8_blocked_rows(tokens, b), F.embedding(tokens, w))
    assert torch.equal(embedding(tokens, b), F.embedding(tokens, w))
    assert b.blocks.numel() + 2 * b.scales.numel() == m.nbytes  # loading holds what the file stores
    for bad in (quantize_int8(_matrix(20, 64)), quantize_int8(_matrix(32, 64), group=0)):
        with pytest.raises(ValueError, match="multiples of 16"):
            block_int8_in_place(bad)


def test_loaded_int8_layers_hold_blocks_that_share_the_fused_qkv():
    """block_dense_matrices blocks grouped int8 attention, FFN, head and embedding in place (q, k, v views of
    the fused q|k|v), adds no bytes, and leaves routers, per-row int8 and matrices off the 16-row blocks
    alone."""
    w = {"embed": _matrix(64, 64, 1), "layers.0.wq": _matrix(64, 64, 2), "layers.0.wk": _matrix(32, 64, 3),
         "layers.0.wv": _matrix(32, 64, 4), "layers.0.wo": _matrix(64, 64, 5), "layers.1.wq": _matrix(24, 64, 6),
         "layers.1.wk": _matrix(8, 64, 7), "layers.1.wv": _matrix(8, 64, 8)}
    dense = fuse_qkv({k: quantize_int8(v) for k, v in w.items()} | {"layers.0.router": _matrix(4, 64)})
    dense["layers.2.wo"] = quantize_int8(_matrix(64, 64, 9), group=0)
    floats = {k: dequantize_int8(v) for k, v in dense.items() if isinstance(v, Int8Matrix)}
    nbytes = dense_nbytes(dense)
    out = block_dense_matrices(dense)
    for n in ("embed", "layers.0.wqkv", "layers.0.wo", "layers.0.wq", "layers.0.wk", "layers.0.wv"):
        assert isinstance(out[n], Int8Blocks), n
        assert torch.equal(dequantize_int8(unblock_int8(out[n])), floats[n])
    assert out["layers.0.wk"].blocks.data_ptr() > out["layers.0.wqkv"].blocks.data_ptr()
    assert isinstance(out["layers.1.wqkv"], Int8Matrix) and isinstance(out["layers.0.router"], torch.Tensor)
    assert isinstance(out["layers.2.wo"], Int8Matrix)
    assert dense_nbytes(out) == nbytes
    x = torch.randn(5, 64)
    torch.testing.assert_close(linear(x, out["layers.0.wk"]), int8_blocks_linear_reference(x, out["layers.0.wk"]),
                               rtol=1e-5, atol=1e-5)
