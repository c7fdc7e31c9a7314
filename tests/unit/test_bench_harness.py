"""The benchmark harness: llama.cpp timing parsing and the memory cgroup runner (root + cgroup v1 only)."""

from __future__ import annotations

import sys

import pytest

from benchmarks.cgroup import available, run_limited
from benchmarks.llamacpp import parse_timings

LLAMA_STDERR = """
llama_perf_context_print:        load time =     812.12 ms
llama_perf_context_print: prompt eval time =     120.50 ms /    32 tokens (    3.77 ms per token,   265.56 tokens per second)
llama_perf_context_print:        eval time =    2500.00 ms /    31 runs   (   80.65 ms per token,    12.40 tokens per second)
"""


def test_parse_llama_timings():
    t = parse_timings(LLAMA_STDERR)
    assert t["prefill_tokens"] == 32 and abs(t["prefill_tokens_per_s"] - 32 / 0.1205) < 1e-6
    assert t["decode_tokens"] == 31 and abs(t["decode_tokens_per_s"] - 31 / 2.5) < 1e-6
    assert parse_timings("nothing here") == {}


needs_cgroup = pytest.mark.skipif(available() is not None, reason=f"memory cgroups unavailable: {available()}")


@needs_cgroup
def test_over_the_limit_is_killed_for_memory():
    r = run_limited([sys.executable, "-c", "x = bytearray(300 * 2**20)"], 100 * 2**20, name="test-kill", cold=False)
    assert r.killed_for_memory and r.returncode != 0


@needs_cgroup
def test_under_the_limit_succeeds_and_reports_peak():
    r = run_limited([sys.executable, "-c", "x = bytearray(50 * 2**20); print('ok')"], 2**30, name="test-ok",
                    cold=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok" and not r.killed_for_memory
    assert 50 * 2**20 <= r.peak_bytes < 2**30


@needs_cgroup
def test_minimum_budget_holds_under_a_memory_cgroup(tiny_checkpoints, tmp_path):
    """Memory is a promise: at the stated minimum budget, the process fits in budget + its idle overhead
    (page cache counted), measured by the kernel, not by arithmetic."""
    import json
    from pathlib import Path

    from d2moe.config import EngineConfig
    from d2moe.convert.convert import convert
    from d2moe.engine.model import open_model

    store = convert(tiny_checkpoints["mixtral"], tmp_path / "m.d2m", progress=False)
    with open_model(store, EngineConfig(context=16 + 8, step_tokens=16)) as m:
        minimum = m.plan.minimum
    root = str(Path(__file__).parents[2])
    child = [sys.executable, "-m", "benchmarks.bench_child", "--model", str(store), "--threads", "1"]
    idle = run_limited(child + ["--idle"], 2**31, name="test-idle", cold=False, cwd=root).peak_bytes
    r = run_limited(child + ["--budget", str(minimum), "--prompt-tokens", "16", "--tokens", "8"],
                    idle + minimum + 8 * 2**20, name="test-min", cold=False, cwd=root)
    assert r.returncode == 0 and not r.killed_for_memory, r.stderr[-500:]
    assert len(json.loads(r.stdout)["tokens"]) == 8


def test_soak_counts_statuses_server_errors_and_hangs():
    """The serve soak's bookkeeping on a fake server: answers, 5xx and requests that never answer."""
    import asyncio
    import json

    import httpx

    from benchmarks.serve_load import soak

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        kind = body["messages"][0]["content"]
        if "RAID" in kind:  # prompt 3 of 8: never answers
            await asyncio.sleep(5)
        if "Hamlet" in kind:  # prompt 4: a server error
            return httpx.Response(500, json={"error": {"message": "boom"}})
        chunk = {"choices": [{"delta": {"content": "hi"}}]}
        return httpx.Response(200, text=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n")

    res = asyncio.run(soak("http://test", clients=4, total=16, max_tokens=2, timeout=0.3,
                           transport=httpx.MockTransport(handler)))
    assert res["statuses"] == {"200": 12, "500": 2} and res["server_errors_5xx"] == 2
    assert res["failures"] == {"hang": 2} and res["requests"] == 16


def test_resident_decode_and_prefill_rates_are_written(tiny_checkpoints, tmp_path):
    """benchmarks/decode.py: decode tokens/s per width and, with --prefill, the prompt's prefill tokens/s."""
    import json

    from benchmarks import decode
    from d2moe.convert.convert import convert

    store = convert(tiny_checkpoints["mixtral"], tmp_path / "m.d2m", progress=False)
    out = tmp_path / "decode.json"
    assert decode.main(["--model", str(store), "--bits", "8", "3", "--tokens", "4", "--repeats", "1",
                        "--prefill", "12", "--threads", "1", "--out", str(out)]) == 0
    table = json.loads(out.read_text())["results"]
    for b in ("8", "3"):
        assert table[b]["tokens_per_s"] > 0 and table[b]["prefill_tokens"] == 12
        assert table[b]["prefill_tokens_per_s"] > 0 and len(table[b]["prefill_runs"]) == 1


def test_bench_child_runs_a_tier_on_a_calibrated_store(tiny_checkpoints, tmp_path, capsys):
    """`bench --engines "d2moe balanced"` runs router two at that tier: the widths computed are mixed."""
    import json

    from benchmarks import bench_child
    from d2moe.convert.convert import convert
    from tiny_calibration import calibrate_randomly

    store = convert(tiny_checkpoints["mixtral"], tmp_path / "m.d2m", progress=False)
    calibrate_randomly(store)
    assert bench_child.main(["--model", str(store), "--tier", "fast", "--tokens", "6", "--prompt-tokens", "8",
                             "--threads", "1"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["avg_bits_computed"] < 8 and len(res["widths_computed"]) >= 2
