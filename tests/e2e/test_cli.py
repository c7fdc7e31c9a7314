"""The CLI end to end on a converted tiny checkpoint: results on stdout, one-line errors on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TEXT = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer. " * 8


def d2moe(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "d2moe.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "mixtral.d2m"
    r = d2moe("convert", str(tiny_checkpoints["mixtral"]), str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    return out


def test_run_prints_completion(store):
    r = d2moe("run", "--model", str(store), "--max-tokens", "8", "--bits", "4", "Hello")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip("\n")) > 0
    assert "decode" in r.stderr  # stats go to stderr, not stdout
    one = d2moe("run", "--model", str(store), "--max-tokens", "8", "--bits", "4", "--threads", "1", "Hello")
    assert one.returncode == 0 and one.stdout == r.stdout, one.stderr  # greedy: same text on one thread
    auto = d2moe("run", "--model", str(store), "--max-tokens", "8", "--bits", "4", "--threads", "auto", "Hello")
    assert auto.returncode == 0 and auto.stdout == r.stdout, auto.stderr  # chosen per step, same text


def test_eval_json_bits_trade_off(store, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    results = {}
    for bits in (8, 2):
        r = d2moe("eval", "--model", str(store), "--text", str(text), "--bits", str(bits), "--context", "64", "--json")
        assert r.returncode == 0, r.stderr
        results[bits] = json.loads(r.stdout)
    assert results[8]["tokens"] == results[2]["tokens"] == len(TEXT.encode())
    assert results[2]["expert_bytes_read"] < results[8]["expert_bytes_read"]
    assert results[2]["perplexity"] != results[8]["perplexity"]


def test_eval_stepwise_scores_through_the_decode_path(store, tmp_path):
    """--stepwise feeds one token per forward (prefetch, --no-stall and --deadline act as in generation):
    perplexity equal to the one-forward score up to the few-token kernels' int16 activations; --deadline
    alone is a clear error."""
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    res = {}
    for mode in ([], ["--stepwise", "--deadline", "5"]):
        r = d2moe("eval", "--model", str(store), "--text", str(text), "--bits", "8", "--context", "32", "--json",
                  *mode)
        assert r.returncode == 0, r.stderr
        res[bool(mode)] = json.loads(r.stdout)
    assert res[True]["stepwise"] and res[True]["deadline_ms"] == 5 and res[True]["tokens"] == res[False]["tokens"]
    assert abs(res[True]["perplexity"] / res[False]["perplexity"] - 1) < 0.02
    r = d2moe("eval", "--model", str(store), "--text", str(text), "--deadline", "5")
    assert r.returncode == 2 and "--stepwise" in r.stderr and "Traceback" not in r.stderr


def test_info_json(store):
    r = d2moe("info", "--model", str(store), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    sizes = [info["expert_bytes"][str(b)] for b in range(2, 9)]
    assert sizes == sorted(sizes) and sizes[0] > 0 and info["dense_bytes"] > 0


def test_budget_too_small_is_clear(store):
    r = d2moe("run", "--model", str(store), "--memory-budget", "1KiB", "Hi")
    assert r.returncode == 2
    assert r.stderr.startswith("d2moe: error:") and "memory budget" in r.stderr and "Traceback" not in r.stderr


def test_tight_budget_still_runs(store):
    info = json.loads(d2moe("info", "--model", str(store), "--json").stdout)
    quarter = info["expert_bytes"]["8"] // 4 + info["dense_bytes"] + 2**18  # + KV cache and scratch
    r = d2moe("run", "--model", str(store), "--memory-budget", str(quarter), "--max-tokens", "4", "Hello")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--model", "/nonexistent/model", "x"], "no such model directory"),
        (["run", "--memory-budget", "lots", "x"], "cannot read size 'lots'"),
        (["run", "--model", "{tmp}", "x"], "config.json: missing"),
        (["run", "x"], "default model is not built yet"),
        (["eval", "--text", "/nonexistent.txt"], "cannot read"),
        (["convert", "/nonexistent/hf", "/tmp/out"], "no such directory"),
    ],
)
def test_bad_input_one_line_error(args, message, tmp_path):
    r = d2moe(*[a.format(tmp=tmp_path) for a in args], env={"D2MOE_HOME": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["run", "--threads", "0", "x"], ["run", "--bits", "9", "x"],
                                  ["run", "--threads", "many", "x"], ["eval", "--threads", "auto"]])
def test_bad_option_values_are_usage_errors(args):
    r = d2moe(*args)
    assert r.returncode == 2 and f"d2moe {args[0]}: error: argument" in r.stderr and "Traceback" not in r.stderr


def test_calibrate_then_eval_by_tier(store, tmp_path):
    cal = tmp_path / "cal.d2m"
    import shutil

    shutil.copytree(store, cal)
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    r = d2moe("calibrate", "--model", str(cal), "--text", str(text), "--tokens", "128", "--context", "32",
              "--steps", "20", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "balanced" in r.stdout
    res = {}
    for tier in ("max", "balanced", "min"):
        r = d2moe("eval", "--model", str(cal), "--text", str(text), "--tier", tier, "--context", "64", "--json")
        assert r.returncode == 0, r.stderr
        res[tier] = json.loads(r.stdout)
    assert res["max"]["avg_bits"] == 8 and res["min"]["avg_bits"] == 2
    assert res["min"]["expert_bytes_per_token"] < res["balanced"]["expert_bytes_per_token"] <= res["max"][
        "expert_bytes_per_token"]
    for flag in (["--avg-bits", "4"], ["--tier", "balanced"]):
        r = d2moe("eval", "--model", str(store), "--text", str(text), *flag, "--context", "64")
        assert r.returncode != 0 and "d2moe calibrate" in r.stderr and "Traceback" not in r.stderr
    r = d2moe("eval", "--model", str(store), "--text", str(text), "--bits", "4", "--tier", "fast")
    assert r.returncode != 0 and "not allowed with" in r.stderr
