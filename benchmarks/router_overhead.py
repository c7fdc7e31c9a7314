"""Router two's share of decode time: the same greedy decode at a fixed width and through router two at
price 0 (it runs in every MoE layer and picks the widest width, so experts and bytes are identical and the
difference is the router's cost). Every expert is resident; repeats interleave; medians.

    python -m benchmarks.router_overhead [--model PATH] [--tokens 64] [--repeats 5] [--clock wall|cpu]
                                      [--out results/router_overhead.json]

Also times one decode-path width-rule call per MoE layer in isolation (microseconds per call), the number
that multiplies by the layer count (twice with prefetch). `--clock cpu` measures the main thread's CPU time
with one compute thread instead of wall time: robust when other processes share the cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import median, write_result
from benchmarks.decode import PROMPT, add_clock_args, decode_rate, use_clock
from d2moe.default_model.paths import default_model_dir
from d2moe.engine.generate import Request, generate
from d2moe.engine.model import open_model
from d2moe.engine.sampling import SamplingParams
from d2moe.models.moe import one_token_widths, route_layer



def rule_call_us(model, calls: int = 2000) -> float:
    """Median over layers of one T=1 width-rule call, microseconds."""
    dec = model.decoder
    cfg, w = dec.cfg, dec.w
    x = torch.randn(1, cfg.hidden_size)
    bits, price = torch.tensor([model.reader.max_bits]), torch.tensor([0.0])
    per_layer = []
    for L in cfg.moe_layers:
        r = route_layer(x, w, f"layers.{L}.", cfg)
        idx, weight = r.idx[0].tolist(), r.weight[0].tolist()
        for _ in range(50):
            one_token_widths(L, x, r, idx, weight, bits, price, dec.widths)
        t0 = time.thread_time()
        for _ in range(calls):
            one_token_widths(L, x, r, idx, weight, bits, price, dec.widths)
        per_layer.append((time.thread_time() - t0) / calls * 1e6)
    return median(per_layer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="router two's share of decode time")
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    add_clock_args(ap)
    ap.add_argument("--out", default="results/router_overhead.json")
    args = ap.parse_args(argv)
    clock = use_clock(args)
    model = open_model(Path(args.model))
    if model.decoder.widths is None:
        print(f"{args.model} has no calibrated width router: run `d2moe calibrate` first", file=sys.stderr)
        return 2
    bits = model.reader.max_bits
    model.provider.preload(bits)
    ids = tuple(model.require_tokenizer().encode(PROMPT, add_special_tokens=False).ids)
    params = SamplingParams(max_tokens=args.tokens, stop_on_eos=False)
    modes = {"fixed": None, "router": 0.0}
    runs: dict[str, list[float]] = {m: [] for m in modes}
    outputs: dict[str, list[int]] = {}
    for _ in range(2):  # warm-up
        for price in modes.values():
            for _tok in generate(model, Request(ids, SamplingParams(max_tokens=8, stop_on_eos=False), bits, price)):
                pass
    for _ in range(args.repeats):
        for mode, price in modes.items():
            req = Request(ids, params, bits, price)
            runs[mode].append(decode_rate(model, req, clock))
            if mode not in outputs:
                outputs[mode] = list(generate(model, req))
    fixed, router = median(runs["fixed"]), median(runs["router"])
    overhead = fixed / router - 1  # extra time per token, as a fraction of the fixed-width step
    call_us = rule_call_us(model)
    layers = len(model.config.moe_layers)
    result = {"model": args.model, "tokens": args.tokens, "clock": args.clock, "fixed_tokens_per_s": fixed, "router_tokens_per_s": router,
              "runs": runs, "overhead": overhead, "rule_call_us": call_us, "moe_layers": layers,
              "same_tokens": outputs["fixed"] == outputs["router"]}
    out = write_result(args.out, "router_overhead", result)
    print(f"[{args.clock} clock] fixed {fixed:.1f} tok/s, router two at price 0 {router:.1f} tok/s: overhead {overhead:+.1%} "
          f"(one rule call {call_us:.1f} us x {layers} MoE layers = {call_us * layers / 1e3:.2f} ms/token; "
          f"same tokens: {result['same_tokens']})")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
