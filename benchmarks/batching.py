"""Continuous batching on the default model: aggregate greedy tokens/s for 1 vs N concurrent requests, and
decode attention per sequence (the batch-invariant default) against one padded SDPA over all sequences.

    python -m benchmarks.batching [--model PATH] [--concurrency 1 4 8] [--tokens 32] [--threads 1]
                                  [--out results/batching.json]
    python -m benchmarks.batching --serve-pattern 8 --concurrency 1 16   # serve_load's traffic, no HTTP
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import median, write_result
from benchmarks.serve_load import PROMPTS as SERVE_PROMPTS
from d2moe.config import EngineConfig
from d2moe.default_model.paths import default_model_dir
from d2moe.engine.batcher import BatcherConfig
from d2moe.engine.chat_template import load_chat_template
from d2moe.engine.engine import Engine
from d2moe.engine.model import open_model
from d2moe.engine.request import EngineRequest
from d2moe.models.ragged import KVPool, Segment, StepPlan, attend_decode_padded, attend_per_sequence

PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "To be, or not to be,",
           "The quick brown fox", "In 1492, Columbus", "Water boils at", "My favourite food is"]


def aggregate_tps(model, n: int, tokens: int, padded: bool = False) -> float:
    tok = model.require_tokenizer()
    engine = Engine(model, BatcherConfig(max(n, 1), 128, 128 + n), 512, padded_attention=padded)
    for i in range(n):
        ids = tuple(tok.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).ids)
        engine.add(str(i), EngineRequest(ids, tokens, stop_on_eos=False))
    t0, made = time.perf_counter(), 0
    while engine.has_work():
        made += sum(len(o.token_ids) for o in engine.step())
    return made / (time.perf_counter() - t0)


def serve_pattern_tps(model, clients: int, requests: int, tokens: int) -> dict:
    """`benchmarks/serve_load.py`'s traffic without HTTP: each client sends its next chat request (its own
    message, the store's chat template) as soon as its last one ends. Separates what the engine does from
    what the server adds: prompt rows against generated rows, and the aggregate rate."""
    template = load_chat_template(Path(model.path))
    tok = model.require_tokenizer()
    engine = Engine(model, BatcherConfig(clients, 128, 128 + clients), 512)
    left = dict.fromkeys(range(clients), requests)
    prompt_tokens = 0

    def send(c: int) -> None:
        nonlocal prompt_tokens
        i = 1000 * c + left[c]
        msg = [{"role": "user", "content": f"{SERVE_PROMPTS[i % len(SERVE_PROMPTS)]} (request {i})"}]
        ids = tok.encode(template.render(msg) if template else msg[0]["content"], add_special_tokens=False).ids
        prompt_tokens += len(ids)
        engine.add(f"{c}-{left[c]}", EngineRequest(tuple(ids), tokens, stop_on_eos=False))
        left[c] -= 1

    for c in range(clients):
        send(c)
    t0, made, steps = time.perf_counter(), 0, 0
    while engine.has_work():
        steps += 1
        for out in engine.step():
            made += len(out.token_ids)
            if out.finished and left[c := int(out.request_id.split("-")[0])] > 0:
                send(c)
    seconds = time.perf_counter() - t0
    reused = engine.prefix.stats.reused_tokens if engine.prefix is not None else 0
    return {"tok_per_s": round(made / seconds, 2), "generated": made, "prompt_tokens": prompt_tokens,
            "prompt_rows": prompt_tokens - reused, "steps": steps, "seconds": round(seconds, 2)}


def attention_ms(cfg, n: int, length: int, padded: bool, repeats: int = 50) -> float:
    pool = KVPool(cfg, n, length + 1)
    plan = StepPlan(tuple(Segment(s, length - 7 * s % 64, s, 1, True) for s in range(n)))
    q = torch.randn(n, cfg.num_heads, cfg.head_dim)
    fn = attend_decode_padded if padded else attend_per_sequence
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(q, pool, 0, plan, cfg.num_heads != cfg.num_kv_heads)
        times.append(time.perf_counter() - t0)
    return 1e3 * median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="continuous batching throughput")
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/batching.json")
    ap.add_argument("--serve-pattern", type=int, default=0, metavar="REQUESTS",
                    help="instead: serve_load's traffic in process, REQUESTS chat requests per client, each "
                         "client's next sent when its last ends (prefix cache as the server's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n_max = max(args.concurrency)
    if args.serve_pattern:
        return serve_pattern(args)
    model = open_model(Path(args.model), EngineConfig(context=512, kv_slots=n_max))
    model.provider.preload(8)
    aggregate_tps(model, 1, 4)  # warm-up
    result: dict = {"tokens": args.tokens, "threads": args.threads, "tok_per_s": {}, "attention_ms": {}}
    runs = {n: [] for n in args.concurrency}
    for _ in range(args.repeats):
        for n in args.concurrency:
            runs[n].append(aggregate_tps(model, n, args.tokens))
    for n in args.concurrency:
        result["tok_per_s"][n] = round(median(runs[n]), 2)
        print(f"concurrency {n:2d}: {result['tok_per_s'][n]:.1f} tok/s aggregate")
    for n in (1, 4, 8, 16):
        for length in (64, 512):
            ref, fast = (attention_ms(model.config, n, length, p) for p in (False, True))
            result["attention_ms"][f"{n}x{length}"] = {"per_sequence": round(ref, 4), "padded": round(fast, 4)}
            print(f"decode attention {n:2d} seqs x {length} positions: per sequence {ref:.3f} ms, padded {fast:.3f} ms")
    write_result(args.out, "batching", result)
    model.close()
    return 0


def serve_pattern(args: argparse.Namespace) -> int:
    n_max = max(args.concurrency)
    cfg = EngineConfig(context=512, kv_slots=n_max, prefix_cache=512, step_tokens=128 + n_max)
    result: dict = {"tokens": args.tokens, "threads": args.threads, "requests_per_client": args.serve_pattern,
                    "serve_pattern": {}}
    with open_model(Path(args.model), cfg) as model:
        serve_pattern_tps(model, 1, 1, 4)  # warm-up
        for n in args.concurrency:
            runs = [serve_pattern_tps(model, n, args.serve_pattern, args.tokens) for _ in range(args.repeats)]
            best = sorted(runs, key=lambda r: r["tok_per_s"])[len(runs) // 2]  # the median run
            result["serve_pattern"][n] = {**best, "runs": [r["tok_per_s"] for r in runs]}
            print(f"clients {n:2d}: {best['tok_per_s']:.1f} tok/s (runs {[r['tok_per_s'] for r in runs]}); "
                  f"{best['prompt_tokens']} prompt tokens ({best['prompt_rows']} computed, the rest from the "
                  f"prefix cache) for {best['generated']} generated, {best['steps']} steps")
    write_result(args.out, "batching", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
