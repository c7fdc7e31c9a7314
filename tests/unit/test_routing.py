"""Dual routing: router two's choice rule (pure, property-tested), tier prices, and `d2moe calibrate` end to
end on a tiny store: files written, tiers meet their byte targets on the calibration tokens, requests of
different tiers run in one batch, and a store without calibration keeps running fixed widths."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.config import EngineConfig
from d2moe.convert.convert import convert
from d2moe.engine.generate import Request, generate
from d2moe.engine.model import open_model
from d2moe.engine.sampling import SamplingParams
from d2moe.routing.calibrate import calibrate
from d2moe.routing.calibration import CALIBRATION_FILE
from d2moe.routing.collect import collect
from d2moe.routing.fit import FitConfig
from d2moe.routing.tiers import TIER_BYTE_TARGETS, PricePoint, interpolate_price
from d2moe.routing.width_router import ROUTER_FILE, LayerRouter, WidthRouter
from d2moe.storage.format import StoreError

WIDTHS = torch.arange(2, 9)
FRAC = torch.linspace(0.28, 1.0, 7)


FLOORS = torch.tensor([float("inf"), 5.0, 2.0, 1.0, 0.3, 0.01, 0.0], dtype=torch.float64)


def _router(seed: int, H: int = 8, E: int = 4, r: int = 3, floored: bool = False) -> WidthRouter:
    g = torch.Generator().manual_seed(seed)
    p = LayerRouter(torch.randn(H, r, generator=g), torch.randn(E, r, 7, generator=g),
                    torch.randn(E, 7, generator=g), torch.randn(7, generator=g))
    return WidthRouter(WIDTHS, FRAC, {0: p}, FLOORS if floored else None)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0, 50), st.floats(0, 50))
def test_the_floor_holds_and_falls_as_the_price_rises(seed, p1, p2):
    router, plain = _router(seed, floored=True), _router(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, idx, w = torch.randn(5, 8, generator=g), torch.randint(0, 4, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    lc = router.log_costs(0, x, idx, w)
    lo, hi = sorted((p1, p2))
    f_lo, f_hi = router.floor_of(torch.tensor([lo]))[0], router.floor_of(torch.tensor([hi]))[0]
    assert f_hi <= f_lo
    for p, f in ((lo, f_lo), (hi, f_hi)):
        price = torch.full((5,), p)
        got, alone = router.choose(lc, price), plain.choose(lc, price)
        assert (got >= f).all() and torch.equal(got, torch.maximum(alone, f))  # the floor only lifts
    assert router._floor_one(lo) == int(f_lo) and router._floor_one(hi) == int(f_hi)  # both compare in float32
    assert int(router.floor_of(torch.tensor([1e9]))[0]) == 2 and int(router.floor_of(torch.tensor([0.0]))[0]) == 8


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0, 50), st.floats(0, 50))
def test_a_higher_price_never_picks_a_wider_width(seed, p1, p2):
    router = _router(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x, idx, w = torch.randn(5, 8, generator=g), torch.randint(0, 4, (5, 2), generator=g), torch.rand(5, 2, generator=g)
    lc = router.log_costs(0, x, idx, w)
    lo, hi = sorted((p1, p2))
    assert (router.choose(lc, torch.full((5,), hi)) <= router.choose(lc, torch.full((5,), lo))).all()
    assert (router.choose(lc, torch.zeros(5)) == 8).all()  # price 0: the widest (its cost is 0)
    assert (router.choose(lc, torch.full((5,), 1e30)) == 2).all()


@pytest.mark.parametrize("floored", [False, True])
def test_router_file_round_trip(tmp_path, floored):
    router = _router(3, floored=floored)
    router.save(tmp_path / ROUTER_FILE)
    back = WidthRouter.load(tmp_path / ROUTER_FILE)
    x, idx, w = torch.randn(4, 8), torch.randint(0, 4, (4, 2)), torch.rand(4, 2)
    assert torch.equal(back.log_costs(0, x, idx, w), router.log_costs(0, x, idx, w))
    assert (back.floor_prices is None) == (not floored)
    if floored:
        assert torch.equal(back.floor_prices, FLOORS)


def test_price_interpolation():
    curve = [PricePoint(0.0, 8.0, 1.0), PricePoint(1.0, 6.0, 0.7), PricePoint(3.0, 2.0, 0.3)]
    assert interpolate_price(curve, "avg_bits", 7.0) == pytest.approx(0.5)
    assert interpolate_price(curve, "avg_bits", 4.0) == pytest.approx(2.0)
    assert interpolate_price(curve, "avg_bits", 9.0) == 0.0 and interpolate_price(curve, "avg_bits", 1.0) == 3.0


# ---- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stores(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    plain = convert(tiny_checkpoints["mixtral"], root / "plain.d2m", progress=False)
    cal = root / "cal.d2m"
    shutil.copytree(plain, cal)
    ids = torch.randint(3, 200, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    with open_model(cal) as m:
        summary = calibrate(m, ids, tokens=256, context=64, fit=FitConfig(steps=40))
    return plain, cal, summary


def test_calibrate_writes_a_complete_calibration(stores):
    _, cal, summary = stores
    assert (cal / ROUTER_FILE).is_file() and (cal / CALIBRATION_FILE).is_file()
    assert not list(cal.glob(".*tmp*"))  # no temporary files left
    data = json.loads((cal / CALIBRATION_FILE).read_text())
    assert data["tokens"] == 256 and data["widths"] == list(range(2, 9))
    for tier, target in TIER_BYTE_TARGETS.items():
        assert abs(data["tiers"][tier]["byte_frac"] - target) < 0.05, tier
    assert data["tiers"]["high"]["avg_bits"] > data["tiers"]["balanced"]["avg_bits"] > data["tiers"]["fast"]["avg_bits"]
    floors = WidthRouter.load(cal / ROUTER_FILE).floor_prices  # calibrated with its floors
    assert floors is not None and floors[0] == float("inf") and (floors[1:] <= floors[:-1]).all()
    layers = list(data["experts"])
    assert len(data["static_widths"]) == len(layers)
    pop = data["experts"][layers[0]]["popularity"]
    assert sum(pop) == pytest.approx(1.0)


def test_collect_is_deterministic_and_restores_torch_flags(stores):
    """Router two is fitted on these costs; the same text must give the same costs, hence the same router."""
    plain, _, _ = stores
    ids = torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with open_model(plain) as m:
            a, b = collect(m, ids, [2, 3, 8]), collect(m, ids, [2, 3, 8])
    finally:
        torch.set_num_threads(threads)
    assert a.keys() == b.keys() and all(torch.equal(a[L].cost, b[L].cost) for L in a)
    assert any(bool(a[L].cost.abs().sum() > 0) for L in a)
    assert not torch.are_deterministic_algorithms_enabled()


def _gen(model, choice, n: int = 8) -> list[int]:
    return list(generate(model, Request((5, 17, 33, 90), SamplingParams(max_tokens=n, stop_on_eos=False),
                                        choice.bits, choice.price)))


def test_tiers_steer_the_widths(stores, one_thread):
    _, cal, _ = stores
    avg = {}
    for tier in ("max", "high", "balanced", "fast", "min"):
        with open_model(cal, EngineConfig(context=64)) as m:
            _gen(m, m.width_choice(tier=tier))
            hist = m.decoder.width_hist
            avg[tier] = float((hist * torch.arange(16)).sum() / hist.sum())
    assert avg["max"] == 8 and avg["min"] == 2
    assert avg["max"] >= avg["high"] >= avg["balanced"] >= avg["fast"] >= avg["min"]
    assert avg["balanced"] < 8
    with open_model(cal, EngineConfig(context=64)) as m:
        assert m.width_choice(avg_bits=5.0).routed


def test_mixed_tiers_run_in_one_batch(stores, one_thread):
    _, cal, _ = stores
    tokens = torch.tensor([[5, 17, 33, 90, 4, 61], [7, 8, 9, 10, 11, 12]])
    with open_model(cal, EngineConfig(context=64)) as m:
        price = m.width_choice(tier="fast").price
        both = m.decoder.forward(tokens, m.decoder.new_cache(2, 8), 8, price=torch.tensor([[float("nan")] * 6, [price] * 6]))
        alone8 = m.decoder.forward(tokens[:1], m.decoder.new_cache(1, 8), 8)
        alone_fast = m.decoder.forward(tokens[1:], m.decoder.new_cache(1, 8), 8, price=price)
    torch.testing.assert_close(both[:1], alone8, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1:], alone_fast, rtol=1e-4, atol=1e-4)


def test_uncalibrated_store_runs_fixed_widths_only(stores):
    plain, _, _ = stores
    with open_model(plain, EngineConfig(context=64)) as m:
        assert m.calibration is None
        assert m.width_choice(bits=4).bits == 4 and not m.width_choice(bits=4).routed
        assert m.width_choice(tier="max").bits == 8 and m.width_choice(tier="min").bits == 2
        for kw in ({"tier": "balanced"}, {"tier": "fast"}, {"avg_bits": 4.0}):
            with pytest.raises(StoreError, match="d2moe calibrate"):
                m.width_choice(**kw)


def test_broken_calibration_is_a_clear_error(stores, tmp_path):
    _, cal, _ = stores
    bad = tmp_path / "bad.d2m"
    shutil.copytree(cal, bad)
    (bad / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="re-run `d2moe calibrate`"):
        open_model(bad)


def test_finetune_lowers_the_kl_plus_bytes_loss(stores, one_thread):
    """End-to-end training of router two at one price: the loss (KL to the widest model + price x bytes) on
    the same windows falls, and the tuned router still picks wider widths at lower prices."""
    from d2moe.routing.finetune import FinetuneConfig, finetune

    _, cal, summary = stores
    price = summary["tiers"]["balanced"]["price"]
    windows = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(1))
    with open_model(cal, EngineConfig(context=64)) as m:
        router = m.calibration.router
        tuned, log = finetune(m, router, windows, (price, price), FinetuneConfig(steps=24, lr=0.02))
    first = sum(r["loss"] for r in log[:4]) / 4
    last = sum(r["loss"] for r in log[-4:]) / 4
    assert last < first
    x, idx, w = torch.randn(6, m.config.hidden_size), torch.randint(0, m.config.num_experts, (6, 2)), torch.rand(6, 2)
    lc = tuned.log_costs(min(tuned.layers), x, idx, w)
    assert (tuned.choose(lc, torch.full((6,), price * 10)) <= tuned.choose(lc, torch.full((6,), price))).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.integers(1, 4))
def test_log_costs_fast_path_matches_reference(seed, T, k):
    from d2moe.routing.width_router import layer_log_costs, layer_log_costs_reference

    g = torch.Generator().manual_seed(seed)
    z, B, C, v = torch.randn(T, 3, generator=g), torch.randn(5, 3, 7, generator=g), torch.randn(5, 7, generator=g), \
        torch.randn(7, generator=g)
    idx, w = torch.randint(0, 5, (T, k), generator=g), torch.rand(T, k, generator=g)
    torch.testing.assert_close(layer_log_costs(z, B, C, v, idx, w), layer_log_costs_reference(z, B, C, v, idx, w))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0, 20), st.integers(2, 8))
def test_one_token_fast_path_matches_the_batched_rule(seed, price, cap):
    """Decode's list path (`WidthRouter.one_token`) picks what `widths_for` picks, but at float32 ties."""
    from d2moe.models.widths import RoutedWidths

    router = _router(seed, floored=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed + 2)
    x, idx, w = torch.randn(1, 8, generator=g), torch.randint(0, 4, (1, 3), generator=g), torch.rand(1, 3, generator=g)
    ref = torch.clamp(router.widths_for(0, x, idx, w, torch.tensor([price])), max=cap)[0].tolist()
    fast = router.one_token(0, x, idx[0].tolist(), w[0].tolist(), price, cap)
    total = (router.log_costs(0, x, idx, w).exp() + price * FRAC)[0].double()  # [k, W]
    for k, (a, b) in enumerate(zip(fast, ref)):
        if a != b:  # only a tie within float32 rounding may differ
            ta, tb = total[k, WIDTHS.tolist().index(a)], total[k, WIDTHS.tolist().index(b)]
            assert abs(ta - tb) <= 1e-5 * max(abs(ta), abs(tb), 1e-12), (fast, ref)
    rule = RoutedWidths(router)
    r = type("R", (), {"idx": idx, "weight": w})()
    assert rule.one(0, x, idx[0].tolist(), w[0].tolist(), cap, float("nan")) == [cap] * 3  # fixed-width token
    assert rule.one(7, x, idx[0].tolist(), w[0].tolist(), cap, price) == [cap] * 3  # a layer without a router
    assert rule(0, x, r, torch.tensor([cap]), torch.tensor([price]))[0].tolist() == fast  # the one-token rule


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.01, 0.3, 2.0, 1e4]), st.integers(2, 8),
       st.sampled_from([0.1, 1.0, 300.0]))
def test_one_token_kernel_rule_matches_its_python_reference(seed, price, cap, scale):
    """The kernel library's one-call rule picks what the Python loop picks (both cost in double from the same
    float32 inputs; only the float32 matvec's summation order differs), also where the log cost overflows
    exp (x scaled by 300: the Python loop used to raise OverflowError there)."""
    from d2moe.quant.kernels import load_kernel

    if load_kernel() is None:
        pytest.skip("no C++ compiler: the Python rule is the only one")
    router = _router(seed, floored=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed + 5)
    for _ in range(10):
        x = torch.randn(1, 8, generator=g) * scale
        idx, w = torch.randint(0, 4, (3,), generator=g).tolist(), torch.rand(3, generator=g).tolist()
        fast = router.one_token(0, x, idx, w, price, cap)
        ref = router.one_token_reference(0, x, idx, w, price, cap)
        assert fast == ref, (fast, ref)  # random costs: a tie within float32 rounding has never come up


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9))
def test_rows_rule_gives_each_row_its_one_token_widths(seed, T):
    """A batched step's decode rows in one call (`WidthRouter.rows`, `RoutedWidths.rows`) get exactly what each
    row gets alone through `one_token` / `one`: any mix of prices (NaN: a fixed-width request), caps and floors."""
    from d2moe.models.widths import RoutedWidths

    router = _router(seed, floored=seed % 2 == 0)
    g = torch.Generator().manual_seed(seed + 9)
    x, idx, w = torch.randn(T, 8, generator=g), torch.randint(0, 4, (T, 3), generator=g), torch.rand(T, 3, generator=g)
    price = torch.rand(T, generator=g) * torch.tensor([0.0, 0.01, 1.0, 50.0])[torch.randint(0, 4, (T,), generator=g)]
    price[torch.rand(T, generator=g) < 0.3] = float("nan")
    cap = torch.randint(2, 9, (T,), generator=g)
    rule = RoutedWidths(router)
    got = rule.rows(0, x, type("R", (), {"idx": idx, "weight": w})(), cap, price)
    for t in range(T):
        alone = rule.one(0, x[t : t + 1], idx[t].tolist(), w[t].tolist(), int(cap[t]), float(price[t]))
        assert got[t].tolist() == alone, (t, got[t].tolist(), alone)
    no_router = rule.rows(7, x, type("R", (), {"idx": idx, "weight": w})(), cap, price)  # a layer without one
    assert no_router.tolist() == cap[:, None].expand(T, 3).tolist()


def test_router_logits_are_row_invariant_and_close_to_linear():
    """Router one's logits through the kernel library: a row's bits are the same alone and among any rows (MKL's
    GEMM changes them from 1 to 2 rows), within fp32 rounding of F.linear; with a bias too."""
    from d2moe.models.moe import router_invariant, router_logits

    g = torch.Generator().manual_seed(4)
    router, b = torch.randn(8, 70, generator=g), torch.randn(8, generator=g)
    x = torch.randn(33, 70, generator=g)
    if not router_invariant(router):
        pytest.skip("no kernel library: routers run a decode row at a time")
    y = router_logits(x, router, b)
    torch.testing.assert_close(y, x @ router.T + b, rtol=1e-5, atol=1e-5)
    for a, e in ((0, 1), (5, 6), (3, 20), (0, 33)):
        assert torch.equal(router_logits(x[a:e], router, b), y[a:e])
    assert router_invariant(router.half()) and not router_invariant(router[:, :64])  # a strided view: row by row


def test_row_sigmoid_is_row_invariant_where_torch_sigmoid_is_not():
    """Sigmoid-scored routers and Qwen2's shared-expert gate: a row's bits alone and among other rows."""
    from d2moe.models.moe import row_sigmoid

    g = torch.Generator().manual_seed(1)
    for E in (1, 8, 60):
        x = torch.randn(37, E, generator=g) * 3
        y = row_sigmoid(x)
        torch.testing.assert_close(y, torch.sigmoid(x), rtol=0, atol=2e-7)
        assert all(torch.equal(row_sigmoid(x[i : i + 1]), y[i : i + 1]) for i in range(37))
    assert row_sigmoid(torch.tensor([-1e4, 1e4, float("nan")])).tolist()[:2] == [0.0, 1.0]
