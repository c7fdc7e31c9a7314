"""The fitted next-layer guess (routing/next_guess.py): its features are the engine's guess input, the ridge
fit recovers a linear rule and stays at the router when pulled hard, it beats the router where the next
layer's choice is predictable, calibrate writes it, the engine loads and counts it, and a damaged file is a
clear error."""

from __future__ import annotations

import dataclasses
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
from d2moe.models.layers import block_input
from d2moe.routing.calibrate import calibrate
from d2moe.routing.calibration import CALIBRATION_FILE
from d2moe.routing.collect import LayerRecord
from d2moe.routing.fit import FitConfig
from d2moe.routing.next_guess import (NEXT_GUESS_FILE, fit_next_guess, guess_features, hit_rate,
                                      load_next_guess, ridge_toward, save_next_guess)
from d2moe.storage.format import StoreError
from d2moe.storage.reader import StoreReader


@pytest.fixture(scope="module")
def plain(tiny_checkpoints, tmp_path_factory):
    return convert(tiny_checkpoints["mixtral"], tmp_path_factory.mktemp("g") / "m.d2m", progress=False)


@pytest.fixture(scope="module")
def cfg(plain):
    return StoreReader(plain).config.model


def _weights(cfg, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, E = cfg.hidden_size, cfg.num_experts
    w = {}
    for L in range(cfg.num_layers):
        w[f"layers.{L}.ffn_norm"] = torch.rand(H, generator=g) + 0.5
        w[f"layers.{L}.ffn_norm_b"] = torch.randn(H, generator=g) * 0.1
        w[f"layers.{L}.router"] = torch.randn(E, H, generator=g)
    return w


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["rms", "layer", "post"]))
def test_features_are_the_residual_stream_normed_by_the_next_layer(cfg, seed, kind):
    c = dataclasses.replace(cfg, norm="layer" if kind == "layer" else cfg.norm, post_norm=kind == "post")
    w = _weights(c, seed)
    h = torch.randn(7, c.hidden_size, generator=torch.Generator().manual_seed(seed)) * 3
    L, N = c.moe_layers[0], c.moe_layers[1]
    x = block_input(h, w, f"layers.{L}.ffn_norm", c)
    torch.testing.assert_close(guess_features(x, w, L, N, c), block_input(h, w, f"layers.{N}.ffn_norm", c),
                               rtol=1e-4, atol=1e-4)


def test_ridge_recovers_a_linear_rule_and_a_hard_pull_keeps_the_prior():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 6, generator=g)
    truth = torch.randn(7, 3, generator=g)  # 6 weights and a bias per output
    Z = X @ truth[:-1] + truth[-1]
    prior = torch.randn(7, 3, generator=g)
    loose, hard = ridge_toward(X, Z, prior, [1e-9, 1e9])
    torch.testing.assert_close(loose, truth, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hard, prior, rtol=1e-4, atol=1e-4)


def test_the_fit_beats_the_router_when_the_next_choice_is_predictable(cfg):
    """Synthetic records: the next layer's input is a fixed linear map of this layer's, so its router's choice
    on this layer's state is often wrong and the fitted guess is nearly always right."""
    c = dataclasses.replace(cfg, post_norm=True)  # features = x itself
    g = torch.Generator().manual_seed(1)
    H, E, k, T = c.hidden_size, c.num_experts, c.top_k, 2000
    w = _weights(c, 2)
    M = torch.randn(H, H, generator=g) / H**0.5
    records, x = {}, torch.randn(T, H, generator=g)
    for L in c.moe_layers:
        logits = x @ w[f"layers.{L}.router"].T
        idx = logits.topk(k, -1).indices
        records[L] = LayerRecord(x, idx, torch.ones(T, k), torch.zeros(T, k, 1), torch.zeros(T, k, 1))
        x = x @ M
    fitted, report = fit_next_guess(records, w, c)
    assert set(fitted) == set(c.moe_layers[1:])
    rates = report["held_out_hit_rate"]
    assert rates["fitted"] > 0.95 and rates["fitted"] > rates["router"] + 0.2
    P, b = fitted[c.moe_layers[1]]
    assert P.shape == (E, H) and b.shape == (E,)
    assert hit_rate(torch.tensor([[0, 1]]), torch.tensor([[1, 2]])) == 0.5


def test_a_layer_the_router_already_guesses_keeps_the_router(cfg):
    """Every layer reads the same state, so the router's own guess is always right: no fit can beat it on the
    held-out tokens, none is kept, and the report says so."""
    c = dataclasses.replace(cfg, post_norm=True)
    g = torch.Generator().manual_seed(3)
    H, k, T = c.hidden_size, c.top_k, 400
    w = _weights(c, 4)
    x = torch.randn(T, H, generator=g)
    records = {L: LayerRecord(x, (x @ w[f"layers.{L}.router"].T).topk(k, -1).indices, torch.ones(T, k),
                              torch.zeros(T, k, 1), torch.zeros(T, k, 1)) for L in c.moe_layers}
    fitted, report = fit_next_guess(records, w, c)
    assert fitted == {} and all(v["pull"] is None for v in report["per_layer"].values())
    assert report["held_out_hit_rate"] == {"router": 1.0, "fitted": 1.0}


# ---- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(plain, tmp_path_factory):
    cal = tmp_path_factory.mktemp("gc") / "cal.d2m"
    shutil.copytree(plain, cal)
    ids = torch.randint(3, 200, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    with open_model(cal) as m:
        calibrate(m, ids, tokens=256, context=64, fit=FitConfig(steps=10))
    return cal


def test_calibrate_writes_the_guess_and_the_engine_loads_and_counts_it(plain, calibrated, one_thread):
    data = json.loads((calibrated / CALIBRATION_FILE).read_text())
    assert data["next_guess"]["file"] == NEXT_GUESS_FILE and (calibrated / NEXT_GUESS_FILE).is_file()
    assert set(data["next_guess"]["held_out_hit_rate"]) == {"router", "fitted"}
    prompt = Request((5, 17, 33, 90, 4), SamplingParams(max_tokens=10, stop_on_eos=False), 8)
    small = EngineConfig(context=64, step_tokens=5)
    with open_model(plain, small) as a, open_model(calibrated, small) as b:
        later = [int(L) for L, v in data["next_guess"]["per_layer"].items() if v["pull"] is not None]
        assert later  # this seed's tiny model: fits that beat the router on held-out tokens
        assert {k for k in b.decoder.w if ".guess" in k} == {f"layers.{L}.{n}" for L in later for n in ("guess", "guess_b")}
        extra = sum(b.decoder.w[f"layers.{L}.{n}"].nbytes for L in later for n in ("guess", "guess_b"))
        assert b.dense_bytes == a.dense_bytes + extra  # the budget counts it
        budget = a.plan.minimum + 16 * 4096  # a thrashing cache: the guess decides reads, never tokens
    with open_model(plain, dataclasses.replace(small, memory_budget=budget)) as a, \
            open_model(calibrated, dataclasses.replace(small, memory_budget=budget + extra)) as b:
        assert list(generate(a, prompt)) == list(generate(b, prompt))
        assert b.provider.stats.predicted  # guesses were made and scored
    with open_model(calibrated, dataclasses.replace(small, policy="hobbit")) as h:  # HOBBIT guesses by the router
        assert not any(k.endswith(".guess") for k in h.decoder.w) and h.dense_bytes == a.dense_bytes


@pytest.mark.parametrize("damage", ["garbage", "shape", "missing"])
def test_a_damaged_guess_file_is_a_clear_error(calibrated, cfg, tmp_path, damage):
    bad = tmp_path / "bad.d2m"
    shutil.copytree(calibrated, bad)
    f = bad / NEXT_GUESS_FILE
    if damage == "garbage":
        f.write_bytes(b"\x00" * 64)
    elif damage == "shape":
        save_next_guess({cfg.moe_layers[1]: (torch.zeros(3, 3), torch.zeros(3))}, f)
    else:
        f.unlink()
    with pytest.raises(StoreError, match="re-run `d2moe calibrate`"):
        open_model(bad)


def test_load_refuses_tensors_that_do_not_fit(cfg, tmp_path):
    f = tmp_path / "g.safetensors"
    H, E = cfg.hidden_size, cfg.num_experts
    save_next_guess({cfg.moe_layers[1]: (torch.full((E, H), float("nan")), torch.zeros(E))}, f)
    with pytest.raises(ValueError, match="not finite"):
        load_next_guess(f, cfg)
    dense = [L for L in range(cfg.num_layers) if L not in cfg.moe_layers]
    if dense:
        save_next_guess({dense[0]: (torch.zeros(E, H), torch.zeros(E))}, f)
        with pytest.raises(ValueError, match="not a MoE layer"):
            load_next_guess(f, cfg)
