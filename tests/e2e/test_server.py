"""`d2moe serve` end to end on loopback: the official openai client, raw HTTP for every bad-input class,
batching invariance over HTTP, client disconnects, the bounded queue and the API key."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from d2moe.convert.convert import convert
from server_fixture import running_server, with_chat_template
from tiny_calibration import calibrate_randomly

openai = pytest.importorskip("openai")

KEY = "sekrit"


@pytest.fixture(scope="module")
def stores(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    plain = convert(tiny_checkpoints["mixtral"], root / "base.d2m", progress=False)
    chat = with_chat_template(plain, root / "tiny.d2m")
    cal = with_chat_template(plain, root / "cal" / "tiny.d2m")
    calibrate_randomly(cal)
    return chat, cal


@pytest.fixture(scope="module")
def server(stores):
    with running_server(stores[0], "--context", "200", "--max-batch", "4", "--prefill-chunk", "16") as base:
        yield base


@pytest.fixture(scope="module")
def cal_server(stores):
    """Calibrated (tiers route widths per token), API key, 8 slots, no queue beyond them."""
    with running_server(stores[1], "--context", "200", "--max-batch", "8", "--max-queue", "0",
                        "--prefill-chunk", "8", "--api-key", KEY) as base:
        yield base


def client(base: str, key: str = "none"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)


def test_openai_client_completions_and_chat(server):
    c = client(server)
    (model,) = [m.id for m in c.models.list().data]
    assert model == "tiny.d2m"
    r = c.completions.create(model=model, prompt="Hello", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.prompt_tokens == 5
    assert 1 <= r.usage.completion_tokens <= 8
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=model, prompt="Hello", max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    msgs = [{"role": "user", "content": "Hi there"}]
    chat = c.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens > 8
    parts = list(c.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_stop_seed_echo_logprobs(server):
    c = client(server)
    full = c.completions.create(model="tiny.d2m", prompt="abc", max_tokens=24, temperature=0).choices[0].text
    stop = full[5:8]
    cut = c.completions.create(model="tiny.d2m", prompt="abc", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    a, b = (c.completions.create(model="tiny.d2m", prompt="abc", max_tokens=12, temperature=0.9, seed=7)
            .choices[0].text for _ in range(2))
    assert a == b
    # lm-evaluation-harness scores a prompt with echo + logprobs and max_tokens = 0
    r = c.completions.create(model="tiny.d2m", prompt="To be or not", max_tokens=0, echo=True, logprobs=1,
                             temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "To be or not" and len(lp.tokens) == 12
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert r.usage.completion_tokens == 0
    long = "To be, or not to be, that is the question: whether"  # 50 tokens: 4 prefill chunks of 16
    whole = c.completions.create(model="tiny.d2m", prompt=long, max_tokens=2, echo=True, logprobs=0, temperature=0)
    parts = list(c.completions.create(model="tiny.d2m", prompt=long, max_tokens=2, echo=True, logprobs=0,
                                      temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    streamed = [x for p in parts if p.choices[0].logprobs for x in p.choices[0].logprobs.token_logprobs]
    assert streamed == whole.choices[0].logprobs.token_logprobs and len(streamed) == 52
    g = c.completions.create(model="tiny.d2m", prompt="To be or not", max_tokens=3, logprobs=2, temperature=0)
    assert len(g.choices[0].logprobs.token_logprobs) == 3
    assert all(len(t) == 2 for t in g.choices[0].logprobs.top_logprobs)


def test_metrics_and_health(server):
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    text = httpx.get(server + "/metrics").text
    for name in ("d2moe_requests_total", "d2moe_generation_tokens_total", "d2moe_queue_depth", "d2moe_batch_size",
                 "d2moe_expert_cache_hit_rate", "d2moe_expert_bytes_read_total", "d2moe_tokens_per_second",
                 "d2moe_expert_widths_total", "d2moe_prefix_cache_hits_total"):
        assert f"# TYPE {name} " in text


def _metric(base: str, name: str) -> int:
    return int(re.search(rf"^{name} (\d+)$", httpx.get(base + "/metrics").text, re.M).group(1))


def test_a_conversation_reuses_its_earlier_turns(server, stores):
    """The second turn's prompt begins with the first's: its chunks come from the prefix cache, and the
    answer is the one a cold server gives (the cache keeps exact bits)."""
    c = client(server)
    turn = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}]
    first = c.chat.completions.create(model="tiny.d2m", messages=turn, max_tokens=6, temperature=0)
    hits = _metric(server, "d2moe_prefix_cache_hits_total")
    reused = _metric(server, "d2moe_prefix_cache_reused_tokens_total")
    turn2 = turn + [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And another one"}]
    again = c.chat.completions.create(model="tiny.d2m", messages=turn2, max_tokens=6, temperature=0)
    assert _metric(server, "d2moe_prefix_cache_hits_total") == hits + 1
    assert _metric(server, "d2moe_prefix_cache_reused_tokens_total") > reused
    with running_server(stores[0], "--context", "200", "--max-batch", "4", "--prefill-chunk", "16",
                        "--prefix-cache", "0") as cold:
        ref = client(cold).chat.completions.create(model="tiny.d2m", messages=turn2, max_tokens=6, temperature=0)
    assert again.choices[0].message.content == ref.choices[0].message.content


BAD = [
    # (method, path, body (dict, or str sent raw), status, message fragment)
    ("POST", "/v1/completions", "{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "does not exist"),
    ("POST", "/v1/completions", {"prompt": "hi", "tier": "ultra"}, 400, "unknown tier"),
    ("POST", "/v1/completions", {"prompt": "hi", "avg_bits": 4}, 400, "d2moe calibrate"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "empty"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 10_000}, 400, "context"),
    ("POST", "/v1/completions", {"prompt": "x" * 300}, 400, "longer than the context"),
    ("POST", "/v1/completions", '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("POST", "/v1/completions", '{"prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("POST", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n = 1"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n = 1"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("POST", "/v1/completions", {"prompt": "hi", "bits": 4, "tier": "fast"}, 400, "at most one"),
    ("POST", "/v1/completions", {"prompt": "y" * (5 << 20)}, 413, "too large"),
    ("POST", "/v1/nothing", {}, 404, "no such route"),
    ("GET", "/v1/completions", None, 405, "not allowed"),
    ("POST", "/v1/completions", None, 400, "body"),
]


@pytest.mark.parametrize("method,path,body,status,fragment", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error(server, method, path, body, status, fragment):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else (
        {"json": body} if body is not None else {})
    r = httpx.request(method, server + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and fragment in err["message"], err
    # and the server keeps serving
    ok = httpx.post(server + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_disconnect_mid_stream_frees_the_slot(server):
    with httpx.stream("POST", server + "/v1/completions", timeout=30,
                      json={"prompt": "abc", "max_tokens": 180, "stream": True, "temperature": 0}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while True:  # aborted at a step boundary: nothing left running
        m = httpx.get(server + "/metrics").text
        if 'd2moe_requests_total{reason="abort"}' in m and "\nd2moe_running_requests 0" in m:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.1)


def test_api_key_required_except_health(cal_server):
    assert httpx.get(cal_server + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(cal_server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(cal_server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(cal_server).models.list()


def test_concurrent_mixed_tiers_equal_alone_over_http(cal_server):
    """Batching invariance through the server: 8 concurrent greedy requests at mixed tiers == each alone."""
    c = client(cal_server, KEY)
    tiers = ["max", "high", "balanced", "fast", "min", "balanced", "high", "max"]
    prompts = ["Hello there", "To be, or not to be", "abc", "The quick brown fox jumps", "x",
               "Once upon a time", "0123456789", "Why is the sky blue?"]

    def ask(i: int) -> str:
        return c.completions.create(model="tiny.d2m", prompt=prompts[i], max_tokens=16, temperature=0,
                                    extra_body={"tier": tiers[i]}).choices[0].text

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    assert len(set(alone)) > 1


def test_chat_page_and_width_stats(cal_server):
    page = httpx.get(cal_server + "/")  # open like /health: the page's own API calls send the key
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "d2moe_stats" in page.text
    headers = {"Authorization": f"Bearer {KEY}"}
    means = {}
    for tier in ("max", "balanced", "min"):
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0,
                "tier": tier, "d2moe_stats": True}
        r = httpx.post(cal_server + "/v1/chat/completions", json=body, headers=headers, timeout=60).json()
        stats = r["choices"][0]["d2moe"]
        assert len(stats["avg_bits"]) == len(stats["expert_bytes"]) == r["usage"]["completion_tokens"]
        means[tier] = sum(stats["avg_bits"]) / len(stats["avg_bits"])
        chunks = []
        with httpx.stream("POST", cal_server + "/v1/chat/completions", json={**body, "stream": True},
                          headers=headers, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        assert [b for c in chunks for b in c.get("d2moe", {}).get("avg_bits", [])] == stats["avg_bits"]
    assert means["max"] == 8 and means["min"] == 2 and 2 <= means["balanced"] <= 8


def test_queue_full_gets_429_with_retry_after(cal_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "abc", "max_tokens": 190, "stream": True, "ignore_eos": True}  # hold the slots
    streams = [httpx.stream("POST", cal_server + "/v1/completions", json=body, headers=headers, timeout=60)
               for _ in range(8)]
    try:
        for s in streams:  # 8 slots, queue 0: all eight are in
            s.__enter__()
        r = httpx.post(cal_server + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers=headers)
        assert r.status_code == 429 and "Retry-After" in r.headers and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for s in streams:
            s.__exit__(None, None, None)


def test_chunked_oversized_body_gets_413(server):
    def body():
        yield b'{"prompt": "'
        for _ in range(5):
            yield b"z" * (1 << 20)

    r = httpx.post(server + "/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_port_taken_is_a_one_line_error(stores):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "d2moe.cli", "serve", "--model", str(stores[0]), "--port",
                            str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr
