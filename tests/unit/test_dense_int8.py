"""Per-row int8 dense matrices: quantization bounds, the fast matmul against its reference, embedding,
q|k|v fusion, and a store converted with --dense-dtype int8 against the fp32 store."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.models.dense import (
    Int8Matrix,
    column_scales,
    dense_nbytes,
    dequantize_int8,
    from_stored,
    fuse_qkv,
    int8_embedding,
    int8_embedding_reference,
    int8_linear,
    int8_linear_reference,
    kernel_fits,
    quantize_int8,
    to_stored,
)
from d2moe.models.layers import Rope, embedding, linear, rms_norm, rms_norm_reference


def _matrix(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g) * 0.2  # rows of different scale
    w[0, 0] = 3.0  # an outlier row
    return w


# ---- quantization ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 24),
    inp=st.sampled_from([1, 7, 16, 40, 64, 70, 128, 192]),
    log_scale=st.floats(-20, 20),
    zero_row=st.booleans(),
    seed=st.integers(0, 2**16),
    group=st.sampled_from([0, 16, 64]),
)
def test_round_trip_within_half_a_step(out, inp, log_scale, zero_row, seed, group):
    """Per row (group 0, or a width the group does not divide) or per row and group of columns."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 2.0**log_scale
    if zero_row:
        w[0] = 0.0
    m = quantize_int8(w, group=group)
    assert m.q.dtype == torch.int8 and m.scale.dtype == torch.bfloat16
    groups = inp // group if group and inp % group == 0 else 0
    assert m.q.shape == w.shape and m.scale.shape == ((out, groups) if groups else (out,))
    assert int(m.q.abs().max()) <= 127 and bool((m.scale.float() > 0).all())
    err = (w - dequantize_int8(m)).abs()
    assert bool((err <= 0.5 * column_scales(m) * (1 + 1e-6)).all())
    size = inp // groups if groups else inp
    wg, qg = w.view(out, -1, size), m.q.view(out, -1, size)
    nonzero = wg.abs().amax(2) > 0
    # the scale is max|group| / 127 to bf16 precision: the largest code is 126 or 127 (nothing wasted)
    assert bool((qg.abs().amax(2)[nonzero] >= 126).all())
    if zero_row:
        assert bool((m.q[0] == 0).all())


def test_int8_error_is_small_relative_to_the_matrix():
    w = _matrix(256, 576)
    m = quantize_int8(w)
    rel = (w - dequantize_int8(m)).norm() / w.norm()
    assert rel < 0.01
    assert m.nbytes == 256 * 576 + 256 * 9 * 2  # a bf16 scale per 64 columns
    per_row = quantize_int8(w, group=0)
    assert per_row.nbytes == 256 * 576 + 256 * 2 and not per_row.grouped
    assert (w - dequantize_int8(m)).norm() < (w - dequantize_int8(per_row)).norm()


# ---- matmul: fast path vs reference -----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 5, 31, 32, 128])
@pytest.mark.parametrize("shape", [(576, 576), (13, 64), (1, 32), (37, 48), (300, 160), (10, 37), (7, 3)])
@pytest.mark.parametrize("group", [0, 64])
def test_int8_linear_matches_reference(T, shape, group):
    out, inp = shape
    m = quantize_int8(_matrix(out, inp, seed=T), group=group)
    x = torch.randn(1, T, inp, generator=torch.Generator().manual_seed(1))
    y = int8_linear(x, m)
    ref = int8_linear_reference(x, m)
    assert y.dtype == torch.float32 and y.shape == (1, T, out)
    # bf16 activations and bf16 rounding of the kernel's output: a few 2^-9 relative to sum |x| |w|
    bound = x.abs() @ dequantize_int8(m).abs().T
    assert bool(((y - ref).abs() <= 2**-7 * bound + 1e-6).all())


def test_kernel_only_on_shapes_it_handles():
    """The AVX-512 kernel has no tail over columns and uses aligned loads: odd widths and misaligned views
    must take the dequantizing path (still correct)."""
    assert kernel_fits(quantize_int8(_matrix(8, 64)))
    assert not kernel_fits(quantize_int8(_matrix(8, 40)))
    m = quantize_int8(_matrix(9, 64), group=0)
    shifted = Int8Matrix(m.q.view(-1)[8 : 8 + 64 * 8].view(8, 64), m.scale[:8])  # 8-byte offset view
    assert not kernel_fits(shifted)
    x = torch.randn(1, 64)
    torch.testing.assert_close(int8_linear(x, shifted), int8_linear_reference(x, shifted), atol=5e-2, rtol=1e-2)


def test_linear_accepts_float_and_int8_with_bias():
    w = _matrix(48, 64)
    g = torch.Generator().manual_seed(0)
    b = torch.randn(48, generator=g)
    x = torch.randn(2, 3, 64, generator=g)
    exact = x @ w.T + b
    torch.testing.assert_close(linear(x, w, b), exact)
    y8 = linear(x, quantize_int8(w), b)
    assert (y8 - exact).abs().max() < 0.02 * exact.abs().max()


# ---- embedding ------------------------------------------------------------------------------------------------


def test_embedding_from_int8_is_exact():
    m = quantize_int8(_matrix(100, 32))
    tokens = torch.tensor([[0, 5, 99, 5]])
    rows = int8_embedding(tokens, m)
    assert rows.dtype == torch.float32 and rows.shape == (1, 4, 32)
    torch.testing.assert_close(rows, int8_embedding_reference(tokens, m), atol=0, rtol=0)
    torch.testing.assert_close(embedding(tokens, m), rows, atol=0, rtol=0)
    w = _matrix(100, 32)
    torch.testing.assert_close(embedding(tokens, w.half()), w.half()[tokens].float(), atol=0, rtol=0)


# ---- layers' fast paths -----------------------------------------------------------------------------------------


def test_rms_norm_fast_path_matches_reference():
    x, w = torch.randn(2, 3, 64), torch.rand(64) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("start,T", [(0, 1), (7, 1), (3, 5)])
def test_rope_rotate_matches_apply(start, T):
    rope = Rope(32, 10000.0, 64)
    x = torch.randn(2, T, 3, 32)  # [B, T, h, D]
    ref = rope.apply(x.transpose(1, 2), torch.arange(start, start + T)).transpose(1, 2)
    torch.testing.assert_close(rope.rotate(x, start), ref, atol=1e-6, rtol=1e-5)


# ---- storage and fusion -----------------------------------------------------------------------------------------


def test_stored_form_round_trips_and_counts_bytes():
    m = quantize_int8(_matrix(16, 32))
    dense = {"layers.0.wq": m, "norm": torch.ones(32)}
    flat = to_stored(dense)
    assert set(flat) == {"layers.0.wq", "layers.0.wq.scale", "norm"}
    back = from_stored(flat)
    assert set(back) == {"layers.0.wq", "norm"} and isinstance(back["layers.0.wq"], Int8Matrix)
    assert torch.equal(back["layers.0.wq"].q, m.q) and torch.equal(back["layers.0.wq"].scale, m.scale)
    assert back["layers.0.wq"].q.data_ptr() % 64 == 0
    assert dense_nbytes(back) == 16 * 32 + 16 * 2 + 32 * 4
    with pytest.raises(ValueError, match="scale"):
        from_stored({"x": m.q})


@pytest.mark.parametrize("kind", ["int8", "float16", "float32"])
def test_fused_qkv_views_add_no_bytes_and_match(kind):
    ws = {n: _matrix(r, 64, seed=i) for i, (n, r) in enumerate((("wq", 64), ("wk", 32), ("wv", 32)))}
    conv = {"int8": quantize_int8, "float16": lambda t: t.half(), "float32": lambda t: t}[kind]
    dense = {f"layers.0.{n}": conv(w) for n, w in ws.items()} | {"layers.0.bq": torch.randn(64),
                                                               "layers.0.bk": torch.randn(32),
                                                               "layers.0.bv": torch.randn(32)}
    fused = fuse_qkv(dense)
    assert set(fused) == set(dense) | {"layers.0.wqkv", "layers.0.bqkv"}
    assert dense_nbytes(fused) == dense_nbytes(dense)
    x = torch.randn(1, 3, 64)
    qkv = linear(x, fused["layers.0.wqkv"], fused["layers.0.bqkv"])
    parts = [linear(x, fused[f"layers.0.w{n}"], fused[f"layers.0.b{n}"]) for n in "qkv"]
    torch.testing.assert_close(qkv, torch.cat(parts, -1), atol=1e-5, rtol=1e-5)
    for n in "qkv":  # the views are the original matrices
        a, b = fused[f"layers.0.w{n}"], dense[f"layers.0.w{n}"]
        assert torch.equal(a.q, b.q) if kind == "int8" else torch.equal(a, b)


# ---- a converted store ------------------------------------------------------------------------------------------


def test_int8_dense_store_close_to_fp32(tiny_checkpoints, tmp_path):
    """The tiny Qwen2-MoE has every dense kind (biases, a shared expert and its gate). On disk: matrices
    int8 + bf16 scales; vectors, router and gate fp32. Logits within a small KL of the fp32 store."""
    from safetensors import safe_open

    from d2moe.config import MWQConfig
    from d2moe.convert.convert import convert
    from d2moe.engine.model import open_model

    path = tiny_checkpoints["qwen2_moe"]
    full = open_model(convert(path, tmp_path / "f32.d2m", MWQConfig(), dense_dtype=torch.float32, progress=False))
    q8 = open_model(convert(path, tmp_path / "i8.d2m", MWQConfig(), dense_dtype=torch.int8, progress=False))
    with safe_open(str(tmp_path / "i8.d2m" / "dense.safetensors"), "pt") as f:
        dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
    last = lambda n: n.split(".")[-1]  # noqa: E731
    matrices = {n for n in dtypes if last(n) in ("wq", "wk", "wv", "wo", "embed", "lm_head", "w1", "w3", "w2")}
    assert matrices and {dtypes[n] for n in matrices} == {"I8"}
    assert all(dtypes[n + ".scale"] == "BF16" for n in matrices)
    rest = {dtypes[n] for n in dtypes if n not in matrices and not n.endswith(".scale")}
    assert rest == {"F32"}  # norms, biases, routers, the shared-expert gate
    assert q8.dense_bytes < 0.3 * full.dense_bytes
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    a = full.decoder.forward(ids, full.decoder.new_cache(1, 64), bits=8)
    b = q8.decoder.forward(ids, q8.decoder.new_cache(1, 64), bits=8)
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none")
    assert kl.sum(-1).mean().item() < 1e-3  # measured 1-2e-4 on every tiny family (fp16: ~4e-7)
    # decode one token at a time (the kernel path) agrees with the prefill (the dequantizing path)
    cache = q8.decoder.new_cache(1, 64)
    steps = [q8.decoder.forward(ids[:, :20], cache, bits=8)]
    steps += [q8.decoder.forward(ids[:, t : t + 1], cache, bits=8) for t in range(20, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), b, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("shape", [(576, 576), (960, 576), (40, 1536), (3, 64)])
def test_d2moe_int8_kernel_is_exact_and_batch_invariant(shape):
    """d2moe's VNNI kernel (int16 activations per 64 columns): each activation within 2^-16 of its group's
    largest, so the product within 2^-15 of sum_g amax_g |w_g|; and each row's bits the same whatever rows
    share the call (ragged batching relies on it)."""
    from d2moe.models.dense import KERNEL_MAX_TOKENS
    from d2moe.quant.kernels import load_kernel

    kernel = load_kernel()
    out, inp = shape
    m = quantize_int8(_matrix(out, inp, seed=3), group=0)
    x = torch.randn(KERNEL_MAX_TOKENS, inp, generator=torch.Generator().manual_seed(2)) * 3
    y = kernel.int8_linear(x, m.q, m.scale) if kernel is not None else None
    if y is None:
        pytest.skip("no AVX-512 VNNI kernel on this machine: torch's kernel serves int8 matrices")
    w = dequantize_int8(m).abs()  # [out, in]
    group_max = x.abs().view(x.shape[0], -1, 64).amax(-1)  # [T, G]: each activation is within 2^-16 of it
    bound = group_max @ w.view(out, -1, 64).sum(-1).T  # sum_g amax_g(x) * sum_{j in g} |w_j|
    err = (y - int8_linear_reference(x, m)).abs()
    assert bool((err <= 2**-15 * bound + 2**-20 * (x.abs() @ w.T) + 1e-6).all())
    for rows in (1, 3, 4, 5, 17):  # token tiles of 4 and 1
        assert torch.equal(kernel.int8_linear(x[:rows].contiguous(), m.q, m.scale), y[:rows])
    assert torch.equal(kernel.int8_linear(x[7:8].contiguous(), m.q, m.scale), y[7:8])
    assert torch.equal(int8_linear(x, m), y)  # the path int8_linear takes for few rows


def test_c_rms_norm_matches_reference():
    """The kernel library's one-call RMSNorm (double sum of squares) against the fp32 definition."""
    from d2moe.models.layers import rms_norm_reference
    from d2moe.quant.kernels import load_kernel

    kernel = load_kernel()
    if kernel is None:
        pytest.skip("no C++ compiler")
    g = torch.Generator().manual_seed(4)
    for shape in ((1, 1, 576), (3, 5, 64), (2, 2048)):
        x, w = torch.randn(*shape, generator=g) * 7, torch.randn(shape[-1], generator=g)
        torch.testing.assert_close(kernel.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), rtol=2e-6, atol=1e-6)
