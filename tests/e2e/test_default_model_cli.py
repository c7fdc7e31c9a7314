"""The built-in default model (built by scripts/setup.sh): it answers, and fewer bits trade quality for bytes."""

from __future__ import annotations

import json

import pytest

from d2moe.default_model.paths import default_model_dir, default_texts_dir
from test_cli import d2moe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (default_model_dir() / "config.json").is_file(), reason="run scripts/setup.sh first"),
]


def test_capital_of_france():
    r = d2moe("run", "--max-tokens", "12", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_quarter_int8_budget_runs():
    """The whole-model budget: dense weights + a quarter of the INT8 experts + 1 MiB of KV cache and scratch."""
    info = json.loads(d2moe("info", "--json").stdout)
    budget = info["dense_bytes"] + info["expert_bytes"]["8"] // 4 + 2**20
    r = d2moe("run", "--memory-budget", str(budget), "--max-tokens", "12", "The capital of France is")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "experts 18." in r.stderr or "experts 19." in r.stderr  # the split is reported


def test_fewer_bits_fewer_bytes_higher_perplexity():
    text = default_texts_dir() / "hamlet_gut.txt"
    res = {}
    for bits in (8, 4, 2):
        r = d2moe("eval", "--text", str(text), "--bits", str(bits), "--max-tokens", "1024", "--context", "256",
                  "--json", "--quiet")  # fmt: skip
        assert r.returncode == 0, r.stderr
        res[bits] = json.loads(r.stdout)
    assert res[8]["perplexity"] < res[4]["perplexity"] < res[2]["perplexity"]
    assert res[8]["expert_bytes_read"] > res[4]["expert_bytes_read"] > res[2]["expert_bytes_read"]


@pytest.mark.skipif(not (default_model_dir() / "calibration.json").is_file(),
                    reason="the default model is calibrated by scripts/setup.sh")
def test_tiers_are_monotone_on_held_out_text():
    """Higher tiers never read fewer bytes nor give a worse perplexity (beyond 1 % noise) on Hamlet, which no
    calibration reads; max and min are exactly 8 and 2 bits."""
    text = default_texts_dir() / "hamlet_gut.txt"
    res = {}
    for tier in ("max", "high", "balanced", "fast", "min"):
        r = d2moe("eval", "--text", str(text), "--tier", tier, "--max-tokens", "512", "--context", "256",
                  "--json", "--quiet")  # fmt: skip
        assert r.returncode == 0, r.stderr
        res[tier] = json.loads(r.stdout)
    assert res["max"]["avg_bits"] == 8 and res["min"]["avg_bits"] == 2
    order = ["max", "high", "balanced", "fast", "min"]
    for hi, lo in zip(order, order[1:]):
        assert res[hi]["expert_bytes_per_token"] >= res[lo]["expert_bytes_per_token"], (hi, lo)
        assert res[hi]["perplexity"] <= res[lo]["perplexity"] * 1.01, (hi, lo)
