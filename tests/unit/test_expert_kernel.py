"""Fast CPU expert path vs its reference (dequantize + F.linear), on packed bytes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d2moe.config import MWQConfig
from d2moe.quant.kernels import CpuKernel, expert_ffn, expert_ffn_reference, load_kernel
from d2moe.quant.kernels import build as kbuild
from d2moe.quant.kernels.cpu import SMALL_T
from d2moe.quant.mwq import quantize
from d2moe.quant.pack import ExpertLayout, PackedMatrix, dequantize_packed, pack_expert, unpack_expert

# ||fast - ref|| / ||ref||: float paths differ by summation order only; the few-token kernels quantize
# activations to int16 per group (~1e-4 per matrix, ~4e-4 per expert, ~1e-3 with 100x outliers).
TOL_FLOAT = 2e-6
TOL_INT16 = 2e-3
# (H, I, group_size); 1024/640 columns: the msb kernel's 512-column blocks with and without a tail
SHAPES = [(576, 192, 64), (80, 48, 16), (96, 160, 32), (128, 256, 128), (40, 24, 8), (1024, 640, 64), (512, 1024, 128)]


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """Small experts: one thread is faster and immune to other jobs holding a core (2 threads tested apart)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _packed(h: int, i: int, gs: int, method: str, seed: int = 0) -> tuple[ExpertLayout, bytes]:
    layout = ExpertLayout.swiglu(h, i, MWQConfig(group_size=gs, method=method))
    g = torch.Generator().manual_seed(seed)
    weights = {n: quantize(torch.randn(o, c, generator=g) * 0.05, layout.cfg) for n, o, c in layout.shapes}
    return layout, pack_expert(layout, weights)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-I{s[1]}-g{s[2]}")
@pytest.mark.parametrize("method", ["msb", "residual"])
def test_fast_matches_reference(kernel: CpuKernel, shape: tuple[int, int, int], method: str) -> None:
    h, i, gs = shape
    layout, blob = _packed(h, i, gs, method)
    g = torch.Generator().manual_seed(1)
    for bits in range(2, 9):
        packed = unpack_expert(layout, blob, bits)
        for t in (1, 3, 12, 64):
            x = torch.randn(t, h, generator=g)
            ref = expert_ffn_reference(x, packed, bits)
            tol = TOL_INT16 if t <= SMALL_T else TOL_FLOAT  # int16 activations only on the few-token path
            assert _rel(expert_ffn(x, packed, bits, kernel), ref) < tol, (bits, t)
            assert _rel(expert_ffn(x, packed, bits, kernel, exact=True), ref) < TOL_FLOAT, (bits, t)


@pytest.mark.parametrize("method", ["msb", "residual"])
def test_every_token_tile_and_outliers(kernel: CpuKernel, method: str) -> None:
    """T = 1..17 walks the int16 kernels and every token tile (8, 4, 3, 2, 1); x has a 100x outlier."""
    layout, blob = _packed(256, 128, 64, method, seed=3)
    packed = unpack_expert(layout, blob, 5)
    g = torch.Generator().manual_seed(2)
    for t in range(1, 18):
        x = torch.randn(t, 256, generator=g)
        x[:, 17] *= 100
        ref = expert_ffn_reference(x, packed, 5)
        assert _rel(expert_ffn(x, packed, 5, kernel), ref) < TOL_INT16, t
        assert _rel(expert_ffn(x, packed, 5, kernel, exact=True), ref) < TOL_FLOAT, t
        w = dequantize_packed(packed["w1"], 5)
        assert _rel(kernel.matmul(x, packed["w1"], 5), F.linear(x, w)) < TOL_INT16
        assert _rel(kernel.matmul(x, packed["w1"], 5, exact=True), F.linear(x, w)) < TOL_FLOAT


def test_decode_equals_dequantize(kernel: CpuKernel) -> None:
    for method in ("msb", "residual"):
        layout, blob = _packed(96, 160, 32, method)
        for bits in (2, 5, 8):
            pm = unpack_expert(layout, blob, bits)["w2"]
            torch.testing.assert_close(kernel.decode(pm, bits), dequantize_packed(pm, bits), rtol=1e-6, atol=1e-7)


def test_decode_rows_and_blocked_prefill(kernel: CpuKernel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block of rows decodes to exactly those rows of the whole matrix; the many-token product decodes
    blocks of rows (bounded scratch), so with tiny blocks it still equals the reference; bad ranges refuse."""
    from d2moe.quant.kernels import cpu

    layout, blob = _packed(96, 160, 32, "msb")
    packed = unpack_expert(layout, blob, 6)
    pm = packed["w1"]  # [160, 96]
    whole = kernel.decode(pm, 6)
    for a, b in ((0, 160), (7, 8), (33, 130), (159, 160), (5, 5)):
        assert torch.equal(kernel.decode(pm, 6, (a, b)), whole[a:b])
    for bad in ((-1, 3), (3, 161), (9, 8)):
        with pytest.raises(ValueError):
            kernel.decode(pm, 6, bad)
    blocks = cpu.row_blocks(pm, 1000)  # 1000 weights: 10 rows of 96
    assert blocks[0] == (0, 10) and blocks[-1] == (150, 160)
    assert all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:]))
    assert cpu.row_blocks(pm, 10) == [(r, r + 1) for r in range(160)]  # at least one row per block
    x = torch.randn(SMALL_T + 5, 96, generator=torch.Generator().manual_seed(4))
    ref = expert_ffn_reference(x, packed, 6)
    whole_y = expert_ffn(x, packed, 6, kernel)
    monkeypatch.setattr(cpu, "DECODE_BLOCK", 2000)  # gate/up in blocks of 20 rows, down in blocks of 12
    assert len(cpu.row_blocks(packed["w2"])) > 1
    assert _rel(expert_ffn(x, packed, 6, kernel), ref) < TOL_FLOAT
    assert _rel(whole_y, ref) < TOL_FLOAT


@pytest.mark.parametrize("method", ["msb", "residual"])
def test_two_threads_and_prefill(kernel: CpuKernel, method: str) -> None:
    """The OpenMP split (gate/up rows, barrier, down rows) and the decode + GEMM path for long prompts."""
    layout, blob = _packed(576, 192, 64, method)
    packed = unpack_expert(layout, blob, 4)
    for t in (1, 2, 9, 100):
        x = torch.randn(t, 576)
        ref = expert_ffn_reference(x, packed, 4)
        torch.set_num_threads(2)
        fast = expert_ffn(x, packed, 4, kernel)
        torch.set_num_threads(1)
        assert _rel(fast, ref) < (TOL_INT16 if t <= SMALL_T else TOL_FLOAT)


def test_portable_build_matches_reference(tmp_path: Path) -> None:
    """The non-AVX-512 kernel (what an AVX2-only machine compiles) is correct too, group sizes % 8."""
    k = load_kernel(march="x86-64-v3")
    if k is None:
        pytest.skip("no C++ compiler")
    assert not k.avx512
    for h, i, gs in ((40, 24, 8), (96, 160, 32)):
        layout, blob = _packed(h, i, gs, "residual")
        packed = unpack_expert(layout, blob, 6)
        for t in (1, 5, 20):
            x = torch.randn(t, h)
            assert _rel(expert_ffn(x, packed, 6, k), expert_ffn_reference(x, packed, 6)) < TOL_FLOAT


def test_build_is_cached_and_failure_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    lib = kbuild.build()
    mtime = lib.stat().st_mtime_ns
    assert kbuild.build() == lib and lib.stat().st_mtime_ns == mtime
    monkeypatch.setattr(kbuild, "_compiler", lambda: str(tmp_path / "no-such-g++"))
    with caplog.at_level(logging.WARNING):
        assert load_kernel(tmp_path / "cache") is None
    assert "torch path" in caplog.text
    # without a kernel, expert_ffn is the reference
    layout, blob = _packed(80, 48, 16, "msb")
    packed = unpack_expert(layout, blob, 3)
    x = torch.randn(2, 80)
    monkeypatch.setattr("d2moe.quant.kernels.cpu.load_kernel", lambda *a, **k: None)
    assert torch.equal(expert_ffn(x, packed, 3), expert_ffn_reference(x, packed, 3))


def test_invalid_calls(kernel: CpuKernel) -> None:
    layout, blob = _packed(80, 48, 16, "msb")
    packed = unpack_expert(layout, blob, 3)
    with pytest.raises(ValueError, match="float32"):
        expert_ffn(torch.randn(2, 80, dtype=torch.float64), packed, 3, kernel)
    with pytest.raises(ValueError, match="bits"):
        expert_ffn(torch.randn(2, 80), packed, 4, kernel)
    with pytest.raises(ValueError, match="80"):
        expert_ffn(torch.randn(2, 64), packed, 3, kernel)
    with pytest.raises(ValueError, match="80"):
        kernel.matmul(torch.randn(2, 64), packed["w1"], 3)
    swapped: dict[str, PackedMatrix] = {"w1": packed["w2"], "w3": packed["w3"], "w2": packed["w1"]}
    with pytest.raises(ValueError, match="w2"):
        expert_ffn(torch.randn(2, 80), swapped, 3, kernel)


@pytest.mark.parametrize("method", ["msb", "residual"])
def test_bound_expert_equals_expert_ffn(kernel: CpuKernel, method: str) -> None:
    """The provider's bound expert (structs built once) computes exactly what expert_ffn does, at any T."""
    from d2moe.quant.kernels import BoundExpert

    layout, blob = _packed(96, 160, 32, method)
    buf = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    g = torch.Generator().manual_seed(5)
    for bits in (2, 5, 8):
        packed = unpack_expert(layout, buf[: layout.prefix_bytes(bits)], bits)
        bound = BoundExpert(packed, bits, kernel)
        for t in (1, 3, SMALL_T + 1):
            x = torch.randn(t, 96, generator=g)
            assert torch.equal(bound(x), expert_ffn(x, packed, bits, kernel)), (bits, t)
        assert torch.equal(BoundExpert(packed, bits, None)(x), expert_ffn_reference(x, packed, bits))


@pytest.mark.parametrize("method", ["msb", "residual"])
@pytest.mark.parametrize("threads", [1, 2])
def test_experts_run_together_equal_their_weighted_sum(kernel: CpuKernel, method: str, threads: int) -> None:
    """One kernel call for a layer's experts (decode) equals the weighted sum of single-expert calls."""
    from d2moe.models.expert_provider import weighted_sum
    from d2moe.quant.kernels import BoundExpert

    torch.set_num_threads(threads)
    experts = []
    for seed in range(3):
        layout, blob = _packed(96, 160, 32, method, seed=seed)
        experts.append(BoundExpert(unpack_expert(layout, blob, 6), 6, kernel))
    weights = [0.5, -1.25, 2.0]
    g = torch.Generator().manual_seed(6)
    for t in (1, 2, 4):
        x = torch.randn(t, 96, generator=g)
        want = sum(w * e(x) for e, w in zip(experts, weights))
        got = BoundExpert.run_many(experts, weights, x)
        assert got is not None and _rel(got, want) < 1e-6
        assert _rel(weighted_sum(experts, weights, x), want) < 1e-6
    # mixed widths cannot share a call: declined, and weighted_sum falls back to one call per expert
    mixed = experts[:2] + [BoundExpert(unpack_expert(layout, blob, 4), 4, kernel)]
    assert BoundExpert.run_many(mixed, weights, x) is None
    assert _rel(weighted_sum(mixed, weights, x), sum(w * e(x) for e, w in zip(mixed, weights))) < 1e-6


@pytest.mark.parametrize("tokens", [1, SMALL_T + 4])
def test_project_matches_reference(kernel: CpuKernel, tokens: int) -> None:
    """BoundExpert.project (one matrix, for experts that are not plain SwiGLU: GPT-OSS) on the kernel, both
    the few-token and the decode + GEMM path, against the dequantized reference."""
    from d2moe.quant.kernels import BoundExpert

    layout, blob = _packed(128, 64, 32, "msb")
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(2))
    for bits in (2, 5, 8):
        packed = unpack_expert(layout, blob, bits)
        fast, slow = BoundExpert(packed, bits, kernel), BoundExpert(packed, bits, None)
        assert fast.fast and not slow.fast
        for name, inp in (("w1", x), ("w3", x), ("w2", torch.randn(tokens, 64))):
            ref = F.linear(inp, dequantize_packed(packed[name], bits))
            torch.testing.assert_close(slow.project(name, inp), ref)
            assert _rel(fast.project(name, inp), ref) < TOL_INT16


def test_gptq_blobs_run_on_the_msb_kernels(kernel: CpuKernel) -> None:
    """gptq stores msb's layout (codes chosen otherwise, more of them clamped to 0 / 255): the fast kernels,
    GFNI msb path included, match the reference on its blobs at every width."""
    from d2moe.quant.gptq import quantize_gptq

    h, i, gs = 128, 64, 64
    layout = ExpertLayout.swiglu(h, i, MWQConfig(group_size=gs, method="gptq"))
    g = torch.Generator().manual_seed(4)
    weights = {}
    for name, o, c in layout.shapes:
        x = torch.randn(256, c, generator=g)
        x[:, :2] *= 10
        weights[name] = quantize_gptq(torch.randn(1, o, c, generator=g) * 0.05, (x.T @ x)[None], layout.cfg)[0]
    blob = pack_expert(layout, weights)
    for bits in range(2, 9):
        packed = unpack_expert(layout, blob, bits)
        assert all(pm.method == "msb" and not pm.plane_scales for pm in packed.values())
        for t in (1, 5, 40):
            x = torch.randn(t, h, generator=g)
            ref = expert_ffn_reference(x, packed, bits)
            tol = TOL_INT16 if t <= SMALL_T else TOL_FLOAT
            assert _rel(expert_ffn(x, packed, bits, kernel), ref) < tol, (bits, t)


@pytest.mark.parametrize("shape", [(576, 192), (192, 576), (64, 1536)])
def test_eight_row_gfni_kernel_equals_the_row_kernel(kernel: CpuKernel, shape: tuple[int, int]) -> None:
    """Rows whose count is a multiple of 8 and whose width has a 64-column tail run 8 at a time (one stream of
    512-column code blocks); slices of 4 rows take the one-row kernel. Same bits, every width and tile."""
    import dataclasses

    i, h = shape  # w1 [i, h] of an expert with hidden h, intermediate i
    layout, blob = _packed(h, i, 64, "msb", seed=5)
    g = torch.Generator().manual_seed(6)
    for bits in (2, 5, 8):
        pm = unpack_expert(layout, blob, bits)["w1"]

        def rows(a: int, b: int) -> PackedMatrix:
            cut = {f: getattr(pm, f)[a:b] for f in ("offset", "base_scale", "base")}
            return dataclasses.replace(pm, out_features=b - a, **cut,
                                       plane_scales=tuple(t[a:b] for t in pm.plane_scales),
                                       planes=tuple(t[a:b] for t in pm.planes))

        for t in (1, 3, 8, 13, 16):
            x = torch.randn(t, h, generator=g)
            whole = kernel.matmul(x, pm, bits)
            pieces = torch.cat([kernel.matmul(x, rows(a, a + 4), bits) for a in range(0, i, 4)], dim=1)
            assert torch.equal(whole, pieces), (bits, t)
