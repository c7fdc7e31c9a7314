"""Decode tokens/s of a store with every expert resident, per width (interleaved repeats, medians).

    python benchmarks/decode.py [--model PATH] [--bits 8 4 2] [--tokens 64] [--repeats 3] [--out results/decode.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import median, write_result
from d2moe.default_model.paths import default_model_dir
from d2moe.engine.generate import GenerationStats, Request, generate
from d2moe.engine.model import open_model
from d2moe.engine.sampling import SamplingParams

PROMPT = "The capital of France is Paris. It is known for"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="decode tokens/s with all experts resident")
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/decode.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = open_model(Path(args.model))
    ids = tuple(model.require_tokenizer().encode(PROMPT, add_special_tokens=False).ids)
    for b in sorted(args.bits, reverse=True):
        model.provider.preload(b)  # 8-bit prefixes serve every lower width
    runs: dict[int, list[float]] = {b: [] for b in args.bits}
    params = SamplingParams(max_tokens=args.tokens, stop_on_eos=False)
    for b in args.bits:  # warm-up: the first steps of a process pay one-off costs (allocator, kernel setup)
        for _tok in generate(model, Request(ids, SamplingParams(max_tokens=8, stop_on_eos=False), b)):
            pass
    for _ in range(args.repeats):
        for b in args.bits:  # interleaved so drift hits every width alike
            stats = GenerationStats()
            for _tok in generate(model, Request(ids, params, b), stats):
                pass
            runs[b].append(stats.decode_tokens_per_second)
    table = {str(b): {"tokens_per_s": median(v), "runs": v} for b, v in runs.items()}
    out = write_result(args.out, "decode", {"model": args.model, "tokens": args.tokens, "results": table})
    for b, r in table.items():
        print(f"{b}-bit: {r['tokens_per_s']:.1f} tok/s (runs {', '.join(f'{x:.1f}' for x in r['runs'])})")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
