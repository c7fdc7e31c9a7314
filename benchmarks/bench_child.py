"""One d2moe generation in a fresh process, measured phase by phase; prints one JSON object.

The benchmark parent (benchmarks/bench.py) runs this under a memory cgroup with cold caches:

    python -m benchmarks.bench_child --model STORE --budget BYTES --policy d2moe --bits 8 \
        --prompt-tokens 64 --tokens 32 [--tier T] [--no-stall] [--no-prefetch] [--timeline]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--policy", default="d2moe")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--tier", default=None, help="router two at this tier instead of --bits (calibrated store)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-stall", action="store_true")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument("--loader-threads", type=int, default=1)
    ap.add_argument("--timeline", action="store_true", help="keep I/O and wait events of the decode phase")
    ap.add_argument("--idle", action="store_true", help="import everything, open nothing: the fixed overhead")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from d2moe.config import EngineConfig
    from d2moe.engine.generate import Request, generate
    from d2moe.engine.model import load_tokenizer, open_model
    from d2moe.engine.sampling import SamplingParams

    if args.idle:
        # The fixed cost: interpreter, torch, tokenizer, and the code pages of every compute path a step
        # touches (the kernels run once on tiny tensors), but no model bytes.
        load_tokenizer(args.model)
        _touch_compute_paths()
        print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return 0
    tok = load_tokenizer(args.model)
    text = "The history of the city begins with a small settlement on the river, where traders met " * 40
    ids = tuple(tok.encode(text, add_special_tokens=False).ids[: args.prompt_tokens])
    engine = EngineConfig(
        memory_budget=args.budget, context=len(ids) + args.tokens, step_tokens=len(ids), policy=args.policy,
        prefetch=not args.no_prefetch, max_wait=0.0 if args.no_stall else None, record_timeline=args.timeline,
        loader_threads=args.loader_threads,
    )
    t_open = time.perf_counter()
    model = open_model(args.model, engine)
    open_seconds = time.perf_counter() - t_open

    def snapshot() -> dict:
        p = getattr(model.provider, "stats", None)
        loader = getattr(model.provider, "loader", None)
        return {
            "t": time.perf_counter(),
            "read": model.expert_bytes_read(),
            "needed": getattr(p, "needed_bytes", 0),
            "busy": loader.stats.busy_seconds if loader else 0.0,
            "wait": p.io_wait_seconds if p else 0.0,
        }

    params = SamplingParams(max_tokens=args.tokens, stop_on_eos=False)
    out: list[int] = []
    s0 = snapshot()
    choice = model.width_choice(bits=args.bits, tier=args.tier)
    gen = generate(model, Request(ids, params, choice.bits, price=choice.price))
    out.append(next(gen))
    s1 = snapshot()
    out.extend(gen)
    s2 = snapshot()
    decode_steps = len(out) - 1
    wall = s2["t"] - s1["t"]
    res = {
        "policy": args.policy,
        "bits": args.bits,
        "budget": args.budget,
        "plan": model.plan.__dict__,
        "open_seconds": open_seconds,
        "prompt_tokens": len(ids),
        "prefill_tokens_per_s": len(ids) / (s1["t"] - s0["t"]),
        "decode_tokens_per_s": decode_steps / wall,
        "decode_bytes_read_per_token": (s2["read"] - s1["read"]) / decode_steps,
        "decode_bytes_needed_per_token": (s2["needed"] - s1["needed"]) / decode_steps,
        "disk_busy_fraction": (s2["busy"] - s1["busy"]) / wall,
        "compute_idle_fraction": (s2["wait"] - s1["wait"]) / wall,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "text": tok.decode(out),
        "tokens": out,
    }
    p = getattr(model.provider, "stats", None)
    if p is not None:
        res["degraded"] = {f"{a}->{b}": n for (a, b), n in p.degraded.items()}
        rates = p.prediction_hit_rate()
        res["prediction_hit_rate"] = sum(rates.values()) / len(rates) if rates else None
        res["prediction_hit_rate_per_layer"] = rates
        res["prediction_rank_hits"] = {str(k): v for k, v in sorted(p.rank_hits.items())}  # rank -> [right, guesses]
        res["widths_computed"] = dict(sorted(p.widths.items()))
        done = sum(p.widths.values())
        res["avg_bits_computed"] = sum(b * n for b, n in p.widths.items()) / done if done else None
        res["loader_mode"] = model.provider.loader.mode
        if args.timeline:
            t0 = s1["t"]
            res["timeline"] = {
                "io": [(a - t0, b - t0, layer) for a, b, layer, _, _ in model.provider.loader.stats.events if a >= t0],
                "wait": [(a - t0, b - t0) for a, b in p.wait_events if a >= t0],
            }
    model.close()
    print(json.dumps(res))
    return 0


def _touch_compute_paths() -> None:
    import torch
    import torch.nn.functional as F

    from d2moe.models.dense import quantize_int8
    from d2moe.models.layers import linear
    from d2moe.quant.kernels import BoundExpert, load_kernel
    from d2moe.config import MWQConfig
    from d2moe.quant.mwq import quantize
    from d2moe.quant.pack import ExpertLayout, pack_expert, unpack_expert

    x = torch.randn(4, 64)
    for w in (torch.randn(64, 64), torch.randn(64, 64).half(), quantize_int8(torch.randn(64, 64))):
        linear(x, w)
        linear(x[:1], w)
    q = torch.randn(1, 2, 4, 16)
    F.scaled_dot_product_attention(q, q, q)
    F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool).tril())
    layout = ExpertLayout.swiglu(64, 64, MWQConfig())
    weights = {n: quantize(torch.randn(o, i), MWQConfig()) for n, o, i in layout.shapes}
    expert = BoundExpert(unpack_expert(layout, bytearray(pack_expert(layout, weights)), 8), 8, load_kernel())
    expert(x)
    expert(torch.randn(20, 64))


if __name__ == "__main__":
    sys.exit(main())
