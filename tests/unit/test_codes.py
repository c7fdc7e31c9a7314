"""Byte codes (quant/codes.py): an 8-plane msb expert held as one byte per weight gives the same bits as its
planes on every kernel path, at every width, and its torch reference agrees with the C conversion."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.config import MWQConfig
from d2moe.quant.codes import (
    KQ_ORDER,
    _paired,
    can_hold_codes,
    codes_of,
    from_lanes,
    from_octets,
    planes_from_codes,
    read_codes,
    to_codes_reference,
    to_lanes,
    to_octets,
)
from d2moe.quant.kernels import BoundExpert, CpuKernel, expert_ffn
from d2moe.quant.mwq import quantize
from d2moe.quant.pack import ExpertLayout, PackedMatrix, dequantize_packed, pack_expert, unpack_expert

# (H, I): 576/192 the default model's expert (9 and 3 chunks of 64 a row), 1024/640 whole 512-column blocks
SHAPES = [(576, 192), (1024, 640), (128, 64)]


def _expert(h: int, i: int, method: str = "msb", seed: int = 0) -> dict[str, PackedMatrix]:
    """A random expert's 8-bit views over a private writable buffer."""
    layout = ExpertLayout.swiglu(h, i, MWQConfig(method=method))
    g = torch.Generator().manual_seed(seed)
    weights = {n: quantize(torch.randn(o, c, generator=g) * 0.05, layout.cfg) for n, o, c in layout.shapes}
    buf = torch.frombuffer(bytearray(pack_expert(layout, weights)), dtype=torch.uint8)
    return unpack_expert(layout, buf, 8)


def _as_codes(kernel: CpuKernel, packed: dict[str, PackedMatrix]) -> dict[str, PackedMatrix]:
    out = {n: kernel.to_codes(pm) for n, pm in packed.items()}
    assert all(pm is not None and pm.codes for pm in out.values())
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"H{s[0]}-I{s[1]}")
def test_codes_give_the_planes_bits_at_every_width_and_token_count(kernel: CpuKernel, shape: tuple[int, int]) -> None:
    h, i = shape
    planes, codes = _expert(h, i), _as_codes(kernel, _expert(h, i))
    g = torch.Generator().manual_seed(1)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for bits in (8, 5, 4, 2):
            for t in (1, 2, 3, 4, 7, 8, 12, 16, 17, 40):  # every tile, and the decode + GEMM path above 16
                x = torch.randn(t, h, generator=g)
                want = expert_ffn(x, planes, bits, kernel)
                assert torch.equal(expert_ffn(x, codes, bits, kernel), want), (bits, t, threads)
            x = torch.randn(3, h, generator=g)
            for name in ("w1", "w2"):  # one matrix alone, int16 and float activations
                xm = x if name == "w1" else torch.randn(3, i, generator=g)
                for exact in (False, True):
                    assert torch.equal(kernel.matmul(xm, codes[name], bits, exact),
                                       kernel.matmul(xm, planes[name], bits, exact))
                assert torch.equal(kernel.decode(codes[name], bits), kernel.decode(planes[name], bits))
                assert torch.equal(dequantize_packed(codes[name], bits), dequantize_packed(planes[name], bits))


def test_experts_of_both_kinds_run_together(kernel: CpuKernel) -> None:
    """A layer's step may bind experts held as codes beside experts still on planes."""
    a, b = _expert(576, 192, seed=2), _expert(576, 192, seed=3)
    b_codes = _as_codes(kernel, _expert(576, 192, seed=3))
    x = torch.randn(1, 576)
    for bits in (8, 3):
        mixed = BoundExpert.run_many([BoundExpert(a, bits, kernel), BoundExpert(b_codes, bits, kernel)], [0.7, 0.3], x)
        plain = BoundExpert.run_many([BoundExpert(a, bits, kernel), BoundExpert(b, bits, kernel)], [0.7, 0.3], x)
        assert mixed is not None and torch.equal(mixed, plain)


def test_torch_reference_agrees_with_the_kernel_and_round_trips(kernel: CpuKernel) -> None:
    planes = _expert(1024, 640)
    want = {n: codes_of(pm) for n, pm in planes.items()}
    by_kernel = _as_codes(kernel, _expert(1024, 640))
    by_torch = {n: to_codes_reference(pm) for n, pm in _expert(1024, 640).items()}
    for n in planes:
        assert torch.equal(read_codes(by_kernel[n]), want[n])
        assert torch.equal(read_codes(by_torch[n]), want[n])
        back = planes_from_codes(by_kernel[n])
        assert torch.equal(back.base, planes[n].base)
        assert all(torch.equal(p, q) for p, q in zip(back.planes, planes[n].planes))
        # the codes' top b bits are the b-bit msb code: the weights at b bits equal the planes'
        for bits in (2, 6):
            assert torch.equal(dequantize_packed(by_torch[n], bits), dequantize_packed(planes[n], bits))


def test_only_eight_plane_msb_matrices_become_codes(kernel: CpuKernel) -> None:
    residual = _expert(576, 192, method="residual")["w1"]
    narrow = unpack_expert(ExpertLayout.swiglu(576, 192, MWQConfig()),
                           torch.frombuffer(bytearray(pack_expert(ExpertLayout.swiglu(576, 192, MWQConfig()), {
                               n: quantize(torch.randn(o, c) * 0.05, MWQConfig())
                               for n, o, c in ExpertLayout.swiglu(576, 192, MWQConfig()).shapes})),
                                            dtype=torch.uint8), 4)["w1"]
    for pm in (residual, narrow):
        before = pm.base.clone()
        assert not can_hold_codes(pm) and kernel.to_codes(pm) is None
        assert torch.equal(pm.base, before)  # nothing written
        with pytest.raises(ValueError, match="8-plane msb"):
            to_codes_reference(pm)
    codes = _as_codes(kernel, _expert(128, 64))
    assert kernel.to_codes(codes["w1"]) is None  # already codes


def test_code_experts_take_the_code_kernel_at_any_token_count(kernel: CpuKernel) -> None:
    """Bound to byte codes, an expert runs the code kernel for a prefill too (no decode to amortise): each
    token gets the bits it gets alone, within the int16 activations' error of the reference."""
    from d2moe.quant.kernels import expert_ffn_reference

    codes = _as_codes(kernel, _expert(576, 192, seed=4))
    bound = BoundExpert(codes, 8, kernel)
    assert bound.small_t >= 40
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(5))
    many = bound(x)
    for t in (0, 17, 39):
        assert torch.equal(bound(x[t : t + 1]), many[t : t + 1])
    ref = expert_ffn_reference(x, planes_from_codes_expert(codes), 8)
    assert float((many - ref).norm() / ref.norm()) < 2e-3


def planes_from_codes_expert(codes: dict[str, PackedMatrix]) -> dict[str, PackedMatrix]:
    return {n: planes_from_codes(pm) for n, pm in codes.items()}


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 8).map(lambda k: 64 * k), chunks=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_octet_order_round_trips(out: int, chunks: int, seed: int) -> None:
    """The stored order (octets, pairs interleaved within an array) is a permutation that round-trips, for
    row counts whose arrays hold an odd number of octets too (out = 192: each plane holds 3)."""
    code = torch.randint(0, 256, (out, 64 * chunks), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    stored = to_octets(code)
    assert torch.equal(torch.sort(stored.flatten()).values, torch.sort(code.flatten()).values)
    assert torch.equal(from_octets(stored), code)
    scal = torch.randn(out, chunks).half()
    assert torch.equal(from_lanes(to_lanes(scal)), scal)


@pytest.mark.parametrize("rows", [192, 576, 1024])
def test_a_chunk_holds_its_octet_rows_in_kernel_order(rows: int) -> None:
    """Spot check of the documented order: stored byte of (octet, chunk, run h, row i, byte j) is the code
    of row 8 * octet + i at column 64 * chunk + 4 * KQ_ORDER[h] + j, pairs interleaved by chunk."""
    code = torch.arange(rows * 128, dtype=torch.int64).reshape(rows, 128)  # distinct values (as int64)
    stored = to_octets(code).flatten()
    paired = _paired(rows)
    for octet in (0, 1, rows // 8 - 1):
        for chunk in (0, 1):
            if paired[octet]:
                base = 8 * (octet & ~1) * 128 + chunk * 1024 + (octet & 1) * 512
            else:
                base = 8 * octet * 128 + chunk * 512
            for h, i, j in ((0, 0, 0), (5, 3, 2), (15, 7, 3)):
                want = code[8 * octet + i, 64 * chunk + 4 * KQ_ORDER[h] + j]
                assert stored[base + 32 * h + 4 * i + j] == want, (octet, chunk, h, i, j)


def test_msb_kernel_gives_each_token_its_bits_alone_up_to_its_count(kernel: CpuKernel) -> None:
    """The msb kernel now runs planes up to 256 tokens and codes at any count (it beats decode + GEMM):
    every token of a big call gets the bits it gets alone, on planes and on codes, which also agree."""
    planes, codes = _expert(576, 192, seed=6), _as_codes(kernel, _expert(576, 192, seed=6))
    x = torch.randn(100, 576, generator=torch.Generator().manual_seed(7))
    for bits in (8, 3):
        bp, bc = BoundExpert(planes, bits, kernel), BoundExpert(codes, bits, kernel)
        assert bp.invariant_tokens >= 100 and bc.invariant_tokens >= 100
        many = bp(x)
        assert torch.equal(bc(x), many)
        for t in (0, 31, 99):
            assert torch.equal(bp(x[t : t + 1]), many[t : t + 1])
            assert torch.equal(bc(x[t : t + 1]), many[t : t + 1])
