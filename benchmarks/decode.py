"""Decode tokens/s of a store with every expert resident, per width (interleaved repeats, medians); with
`--prefill N`, also the prefill tokens/s of an N-token prompt (llama-bench's pp N).

    python -m benchmarks.decode [--model PATH] [--bits 8 4 2] [--tokens 64] [--repeats 3] [--clock wall|cpu]
                                [--prefill 128] [--out results/decode.json]

`--clock cpu` counts the main thread's CPU time with one compute thread: a machine shared with other work
inflates wall time, not this (use it to compare changes; quote wall time for speed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import median, write_result
from d2moe.default_model.paths import default_model_dir
from d2moe.engine.generate import Request, generate
from d2moe.engine.model import open_model
from d2moe.engine.sampling import SamplingParams

PROMPT = "The capital of France is Paris. It is known for"


def add_clock_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=2, help="compute threads (wall clock only)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")


def use_clock(args: argparse.Namespace):
    """Set the compute threads for `--clock` and return its clock: wall time with --threads, or the main
    thread's CPU time with one compute thread."""
    torch.set_num_threads(args.threads if args.clock == "wall" else 1)
    return time.perf_counter if args.clock == "wall" else time.thread_time


def decode_rate(model, request: Request, clock=time.perf_counter) -> float:
    """Decode tokens per second of `clock`; the first token comes out of prefill and is not counted."""
    n, t0 = 0, 0.0
    for _tok in generate(model, request):
        n += 1
        if n == 1:
            t0 = clock()
    return (n - 1) / (clock() - t0)


def prefill_rate(model, n: int, bits: int, clock=time.perf_counter) -> float:
    """Prompt tokens per second of `clock` for an n-token prompt (the first token out of prefill)."""
    vocab = model.decoder.cfg.vocab_size
    ids = tuple((i * 7919) % (vocab - 100) + 50 for i in range(n))  # fixed, spread over the vocabulary
    t0 = clock()
    for _tok in generate(model, Request(ids, SamplingParams(max_tokens=1, stop_on_eos=False), bits)):
        break
    return n / (clock() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="decode tokens/s with all experts resident")
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=0, help="also time an N-token prompt's prefill (0: no)")
    add_clock_args(ap)
    ap.add_argument("--out", default="results/decode.json")
    args = ap.parse_args(argv)
    clock = use_clock(args)
    model = open_model(Path(args.model))
    ids = tuple(model.require_tokenizer().encode(PROMPT, add_special_tokens=False).ids)
    for b in sorted(args.bits, reverse=True):
        model.provider.preload(b)  # 8-bit prefixes serve every lower width
    runs: dict[int, list[float]] = {b: [] for b in args.bits}
    prefill: dict[int, list[float]] = {b: [] for b in args.bits}
    params = SamplingParams(max_tokens=args.tokens, stop_on_eos=False)
    for b in args.bits:  # warm-up: the first steps of a process pay one-off costs (allocator, kernel setup)
        for _tok in generate(model, Request(ids, SamplingParams(max_tokens=8, stop_on_eos=False), b)):
            pass
    for _ in range(args.repeats):
        for b in args.bits:  # interleaved so drift hits every width alike
            runs[b].append(decode_rate(model, Request(ids, params, b), clock))
            if args.prefill:
                prefill[b].append(prefill_rate(model, args.prefill, b, clock))
    table = {str(b): {"tokens_per_s": median(v), "runs": v} for b, v in runs.items()}
    if args.prefill:
        for b, v in prefill.items():
            table[str(b)].update(prefill_tokens=args.prefill, prefill_tokens_per_s=median(v), prefill_runs=v)
    out = write_result(args.out, "decode", {"model": args.model, "tokens": args.tokens, "clock": args.clock, "results": table})
    for b, r in table.items():
        print(f"{b}-bit: {r['tokens_per_s']:.1f} tok/s (runs {', '.join(f'{x:.1f}' for x in r['runs'])})")
        if args.prefill:
            print(f"{b}-bit: prefill {args.prefill} tokens {r['prefill_tokens_per_s']:.1f} tok/s "
                  f"(runs {', '.join(f'{x:.1f}' for x in r['prefill_runs'])})")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
