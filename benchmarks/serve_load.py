"""Load on a real `d2moe serve`: concurrency levels, aggregate tokens/s, time to first token and inter-token
latency percentiles, the server's peak RSS, and bad input sent while it is under load (every bad request must
get a 4xx and every good one must still finish).

    python -m benchmarks.serve_load [--model PATH] [--concurrency 1 4 16 32] [--requests-per-client 2]
                                    [--max-tokens 32] [--max-batch 16] [--threads 2] [--out results/serve_load.json]

Soak (`--soak 2000 --memory-budget SIZE`): that many requests from 32 clients with mixed tiers, each client
sending its next request as soon as the last one ends; counts 5xx answers, transport errors and hangs (no
answer within --request-timeout), and the server's peak RSS against its memory budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from benchmarks.common import write_result
from d2moe.default_model.paths import default_model_dir

PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Write a short poem about rain.",
           "Explain RAID 5 simply.", "Who wrote Hamlet?", "Give me three colours.", "What is 12 times 12?",
           "Describe a cat."]
BAD = [("POST", "/v1/completions", "{oops"), ("POST", "/v1/completions", {"prompt": "", "max_tokens": 4}),
       ("POST", "/v1/completions", {"prompt": "hi", "temperature": -1}), ("POST", "/v1/chat/completions",
       {"messages": []}), ("POST", "/v1/completions", {"prompt": "hi", "n": 4}), ("GET", "/v1/completions", None),
       ("POST", "/v1/completions", {"prompt": "hi", "tier": "nope"})]


def percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(cmd: list[str], base: str, tries: int = 600) -> Iterator[subprocess.Popen]:
    """Start a server (its output discarded: an unread pipe would block it once full), wait until /health
    answers 200, and stop it on exit (SIGINT, then kill after 30 s)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        for _ in range(tries):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def level_line(name: str, res: dict, ref: dict | None = None) -> str:
    """One concurrency level's result as a line (with `ref`, the steady p99 TTFT over the unloaded p99)."""
    bad = "" if res["bad_input_all_4xx"] is None else f", bad input 4xx: {res['bad_input_all_4xx']}"
    steady = ""
    if (st := res.get("ttft_steady_s")) and st[99] is not None:
        ratio = f" = {st[99] / ref['ttft_s'][99]:.1f}x unloaded" if ref else ""
        steady = f" (steady p50 {st[50]:.2f}s p99 {st[99]:.2f}s{ratio})"
    rate = f" (steady {res['steady_tok_per_s']:.1f})" if res.get("steady_tok_per_s") else ""
    return (f"{name}concurrency {res['concurrency']:2d}: {res['aggregate_tok_per_s']:7.1f} tok/s{rate}, TTFT p50 "
            f"{res['ttft_s'][50]:.2f}s p99 {res['ttft_s'][99]:.2f}s{steady}, ITL p50 {res['itl_ms'][50]} ms p99 "
            f"{res['itl_ms'][99]} ms, ok {res['ok']}/{res['requests']}{bad}")


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def rss(self) -> int:
        """The process's resident set now (0 once it is gone)."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            return 0

    def run(self) -> None:
        while not self.stop.is_set() and (now := self.rss()):
            self.peak = max(self.peak, now)
            time.sleep(0.05)


TIERS = [None, "high", "balanced", "fast"]  # the soak's requests cycle through these (None: fixed 8 bits)


async def one_request(client: httpx.AsyncClient, i: int, max_tokens: int, tier: str | None = None) -> dict:
    # every request's message is its own (a server's prefix cache may share only the template's system prompt)
    content = f"{PROMPTS[i % len(PROMPTS)]} (request {i})"
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, **({"tier": tier} if tier else {})}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
    return {"status": 200, "ttft": stamps[0] - t0 if stamps else None,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": len(stamps), "stamps": stamps,
            "end": time.perf_counter()}


async def bad_requests(client: httpx.AsyncClient) -> list[int]:
    codes = []
    for method, path, body in BAD:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else (
            {"json": body} if body is not None else {})
        try:
            codes.append((await client.request(method, path, **kw)).status_code)
        except httpx.HTTPError:  # the server dropped the connection instead of answering (a peer does)
            codes.append(0)
    return codes


# A fresh connection per request, for every server measured: llama-server (cpp-httplib) closes idle keep-alive
# connections that httpx's pool then reuses, and the request on it fails with "Server disconnected without
# sending a response" (3 runs of 3 at 16 clients); on loopback a connect costs ~0.1 ms.
FRESH_CONNECTIONS = httpx.Limits(max_keepalive_connections=0)


UNLOADED_IDS = 100_000  # request numbers of the unloaded reference (a level's are 1000 x its concurrency + ...)


async def unloaded(base: str, requests: int, max_tokens: int) -> dict:
    """Time to first token of one request at a time on an otherwise idle, warm server (one request first to
    warm it): the reference the loaded percentiles are compared with."""
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=FRESH_CONNECTIONS) as client:
        await one_request(client, UNLOADED_IDS, max_tokens)
        runs = []
        for i in range(requests):
            t0 = time.perf_counter()
            runs.append({**await one_request(client, UNLOADED_IDS + 1 + i, max_tokens), "wall": time.perf_counter() - t0})
    ttft = [r["ttft"] for r in runs if r.get("ttft") is not None]
    walls = sorted(r["wall"] for r in runs)
    return {"requests": requests, "ttft_s": _percentiles(ttft), "request_s": walls[len(walls) // 2]}


def _percentiles(xs: list[float]) -> dict[int, float | None]:
    return {p: percentile(xs, p) for p in (50, 90, 99)}


def steady_rate(results: list[list[dict]], t0: float) -> float | None:
    """Tokens/s streamed while every client had a request open: from the last client's first request to the
    first client's last answer. The whole run's rate also counts the ramp (clients starting one after another)
    and the tail (clients finishing), when fewer requests run; this is the rate at the stated concurrency."""
    if not results or any(not rs or rs[0].get("status") != 200 for rs in results):
        return None
    start = t0 + max(rs[0]["sent"] for rs in results)
    end = min(rs[-1]["end"] for rs in results)
    if end <= start:
        return None
    n = sum(1 for rs in results for r in rs for s in r.get("stamps", ()) if start <= s <= end)
    return round(n / (end - start), 2)


async def level(base: str, concurrency: int, per_client: int, max_tokens: int, with_bad: bool = True,
                ramp: float = 0.0) -> dict:
    """`concurrency` clients, each sending `per_client` requests one after the other. With `ramp` > 0 client w
    starts at w * ramp / concurrency, and `ttft_steady_s` covers the requests sent once every client runs
    (the load's steady state); `ttft_s` always covers every request (ramp 0: all clients start at once, a
    burst whose last first token waits for every prompt's prefill)."""
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=FRESH_CONNECTIONS) as client:
        async def worker(w: int) -> list[dict]:
            await asyncio.sleep(w * ramp / concurrency)
            out = []
            for k in range(per_client):
                sent = time.perf_counter() - t0
                out.append({**await one_request(client, 1000 * concurrency + w * per_client + k, max_tokens),
                            "sent": sent})
            return out

        t0 = time.perf_counter()
        results, bad = await asyncio.gather(asyncio.gather(*(worker(w) for w in range(concurrency))),
                                            bad_requests(client) if with_bad else asyncio.sleep(0, []))
        wall = time.perf_counter() - t0
    steady_tps = steady_rate(results, t0)
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if r["status"] == 200]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    steady = [r["ttft"] for r in ok if r["ttft"] is not None and r["sent"] >= ramp] if ramp > 0 else []
    itl = [x for r in ok for x in r["itl"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency, "requests": len(flat), "ok": len(ok),
        "rejected": sorted({r["status"] for r in flat if r["status"] != 200}),
        "aggregate_tok_per_s": round(tokens / wall, 2), "wall_s": round(wall, 2),
        "steady_tok_per_s": steady_tps, "ttft_s": _percentiles(ttft), "ramp_s": ramp,
        **({"ttft_steady_s": _percentiles(steady), "steady_requests": len(steady)} if ramp > 0 else {}),
        "itl_ms": {p: (None if (v := percentile(itl, p)) is None else round(1e3 * v, 2)) for p in (50, 90, 99)},
        "bad_input_codes": bad, "bad_input_all_4xx": all(400 <= c < 500 for c in bad) if with_bad else None,
    }


async def soak(base: str, clients: int, total: int, max_tokens: int, timeout: float,
               transport: httpx.AsyncBaseTransport | None = None) -> dict:
    """`total` requests from `clients` clients, each sending its next as soon as the last one ended."""
    statuses: Counter = Counter()
    failures: Counter = Counter()  # transport errors and hangs, by kind
    next_id = iter(range(total))
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, timeout=timeout, transport=transport) as client:
        async def worker() -> None:
            for i in next_id:
                try:
                    r = await asyncio.wait_for(one_request(client, i, max_tokens, TIERS[i % len(TIERS)]), timeout)
                    statuses[r["status"]] += 1
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    failures["hang"] += 1
                except httpx.HTTPError as e:
                    failures[type(e).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    return {"requests": total, "clients": clients, "max_tokens": max_tokens,
            "wall_s": round(time.perf_counter() - t0, 1),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors_5xx": sum(v for k, v in statuses.items() if k >= 500), "failures": dict(failures)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="load test of d2moe serve")
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--ramp", type=float, default=None,
                    help="seconds over which the clients start (default: one unloaded request's duration; 0: all "
                         "at once, a burst)")
    ap.add_argument("--unloaded-requests", type=int, default=8, help="warm single requests for the reference TTFT")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", default="2", help="the server's --threads: a count or auto")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--soak", type=int, default=0, help="instead of the levels: this many requests from 32 clients")
    ap.add_argument("--memory-budget", default=None, help="the server's --memory-budget")
    ap.add_argument("--prefix-cache", default=None, help="the server's --prefix-cache (default: its default)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="a request unanswered this long is a hang")
    ap.add_argument("--out", default=None, help="default results/serve_load.json (--soak: results/serve_soak.json)")
    args = ap.parse_args(argv)
    out_path = args.out or ("results/serve_soak.json" if args.soak else "results/serve_load.json")
    port = free_port()
    cmd = [sys.executable, "-m", "d2moe.cli", "serve", "--model", args.model, "--port", str(port), "--threads",
           str(args.threads), "--max-batch", str(args.max_batch), "--context", str(args.context)]
    cmd += ["--memory-budget", args.memory_budget] if args.memory_budget else []
    cmd += ["--prefix-cache", args.prefix_cache] if args.prefix_cache is not None else []
    base = f"http://127.0.0.1:{port}"
    with running_server(cmd, base) as proc:
        rss = PeakRss(proc.pid)
        idle = rss.rss()  # ready and idle: the model opened, no request yet
        rss.start()
        if args.soak:
            res = asyncio.run(soak(base, 32, args.soak, args.max_tokens, args.request_timeout))
            health = httpx.get(base + "/health", timeout=10).status_code
            rss.stop.set()
            res.update(peak_rss_bytes=rss.peak, rss_at_start_bytes=idle, memory_budget=args.memory_budget,
                       healthy_after=health == 200, threads=args.threads, context=args.context)
            print(f"soak: {res['requests']} requests from 32 clients in {res['wall_s']} s: statuses {res['statuses']}, "
                  f"5xx {res['server_errors_5xx']}, failures {res['failures'] or 'none'}, healthy after: "
                  f"{res['healthy_after']}, peak RSS {rss.peak / 2**20:.0f} MiB (at start {idle / 2**20:.0f} MiB, "
                  f"budget {args.memory_budget})")
            write_result(out_path, "serve_soak", res)
            return 0
        ref = asyncio.run(unloaded(base, args.unloaded_requests, args.max_tokens))
        ramp = ref["request_s"] if args.ramp is None else args.ramp
        print(f"unloaded: TTFT p50 {ref['ttft_s'][50]:.3f}s p99 {ref['ttft_s'][99]:.3f}s over "
              f"{ref['requests']} warm requests, one request {ref['request_s']:.2f}s; clients start over {ramp:.2f}s")
        levels = []
        for c in args.concurrency:
            res = asyncio.run(level(base, c, args.requests_per_client, args.max_tokens, ramp=ramp))
            levels.append(res)
            print(level_line("", res, ref))
        metrics = httpx.get(base + "/metrics").text
        rss.stop.set()
        result = {"max_tokens": args.max_tokens, "max_batch": args.max_batch, "threads": args.threads,
                  "unloaded": ref, "levels": levels, "peak_rss_bytes": rss.peak, "rss_at_start_bytes": idle,
                  "metrics": [ln for ln in metrics.splitlines() if ln and not ln.startswith("#")]}
        print(f"server peak RSS {rss.peak / 2**20:.0f} MiB")
        write_result(out_path, "serve_load", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
