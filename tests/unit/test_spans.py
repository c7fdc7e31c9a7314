"""`BoundExpert.run_spans` (one kernel call for a batched step's expert pieces) against its reference, one
call per piece then `* weight` (models/moe.py `grouped_experts`): the same bits, whatever the widths, the
experts' kinds (planes or byte codes), the piece lengths, the threads and the scratch bound's splitting."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.config import MWQConfig
from d2moe.quant.kernels import BoundExpert, CpuKernel
from d2moe.quant.kernels import cpu as kcpu
from d2moe.quant.mwq import quantize
from d2moe.quant.pack import ExpertLayout, PackedMatrix, pack_expert, unpack_expert

H, I = 128, 64


def _expert(seed: int, method: str = "msb") -> dict[str, PackedMatrix]:
    layout = ExpertLayout.swiglu(H, I, MWQConfig(method=method))
    g = torch.Generator().manual_seed(seed)
    weights = {n: quantize(torch.randn(o, c, generator=g) * 0.05, layout.cfg) for n, o, c in layout.shapes}
    buf = torch.frombuffer(bytearray(pack_expert(layout, weights)), dtype=torch.uint8)
    return unpack_expert(layout, buf, 8)


@pytest.fixture(scope="module")
def experts(kernel: CpuKernel) -> list[BoundExpert]:
    """Plane experts at several widths and byte-code experts: the kinds a layer's ready batch mixes."""
    planes = [_expert(s) for s in range(3)]
    codes = [{n: kernel.to_codes(pm) for n, pm in _expert(10 + s).items()} for s in range(2)]
    assert all(pm is not None and pm.codes for c in codes for pm in c.values())
    return ([BoundExpert(p, b, kernel) for p, b in zip(planes, (8, 5, 3))]
            + [BoundExpert(c, b, kernel) for c, b in zip(codes, (8, 4))])


def _reference(pieces: list[tuple[BoundExpert, int, int]], xs: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    ys = torch.zeros_like(xs)
    for fn, a, e in pieces:
        ys[a:e] = fn(xs[a:e]) * ws[a:e]
    return ys


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=8), gap=st.integers(0, 3),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 1000), block=st.sampled_from([0, 2 * I, 9 * I]))
def test_one_call_equals_one_call_per_piece(experts: list[BoundExpert], lengths: list[int], gap: int,
                                            threads: int, seed: int, block: int) -> None:
    """Pieces of any lengths (gaps between them stay zero), any experts in any order; `block` shrinks the
    scratch bound so the pieces split over several calls (a lone piece above it still runs)."""
    g = torch.Generator().manual_seed(seed)
    pieces, row = [], 0
    for k, n in enumerate(lengths):
        pieces.append((experts[(k * 7 + seed) % len(experts)], row, row + n))
        row += n + gap
    xs, ws = torch.randn(row, H, generator=g), torch.rand(row, 1, generator=g) * 2 - 0.5
    pieces.reverse()  # ready order is not row order
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with pytest.MonkeyPatch.context() as mp:
            if block:
                mp.setattr(kcpu, "DECODE_BLOCK", block)
            ys = torch.zeros_like(xs)
            assert BoundExpert.run_spans(pieces, xs, ws, ys)
        assert torch.equal(ys, _reference(pieces, xs, ws))
    finally:
        torch.set_num_threads(old)


def test_declines_what_cannot_share_a_call(kernel: CpuKernel, experts: list[BoundExpert]) -> None:
    """Nothing written, and False, where the per-piece loop must run: the torch path, a piece beyond a plane
    expert's few-token kernel, or a tensor that is not float32."""
    xs, ws = torch.randn(8, H), torch.ones(8, 1)
    ys = torch.zeros_like(xs)
    torch_path = BoundExpert(_expert(0), 8, None)
    assert not BoundExpert.run_spans([(experts[0], 0, 4), (torch_path, 4, 8)], xs, ws, ys)
    residual = BoundExpert(_expert(0, "residual"), 6, kernel)
    big = torch.randn(residual.small_t + 1, H)
    assert not BoundExpert.run_spans([(residual, 0, big.shape[0])], big, torch.ones(big.shape[0], 1),
                                     torch.zeros_like(big))
    assert not BoundExpert.run_spans([(experts[0], 0, 8)], xs.double(), ws, ys)
    assert not BoundExpert.run_spans([], xs, ws, ys)
    assert torch.equal(ys, torch.zeros_like(xs))


def test_bad_spans_are_refused_by_the_kernel(kernel: CpuKernel, experts: list[BoundExpert]) -> None:
    xs, ws, ys = torch.randn(4, H), torch.ones(4), torch.zeros(4, H)
    for spans in ([0, 5], [2, 2], [-1, 3]):
        with pytest.raises(ValueError, match="spans"):
            kernel.spans_ffn(experts[0]._addrs, [8], spans, xs, ws, ys, I)
