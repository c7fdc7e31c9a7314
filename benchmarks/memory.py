"""Peak RSS of a generation under a memory budget, each run in a fresh process.

Checks the budget claim: peak RSS <= budget + dense weights + a fixed overhead (interpreter, torch, tokenizer,
KV cache, activations). The overhead is measured, not assumed: a run with a budget of one expert gives it.

    python benchmarks/memory.py [--model PATH] [--fractions 1 0.25] [--bits 8] [--out results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import write_result
from d2moe.default_model.paths import default_model_dir

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(2)
from d2moe.engine.model import open_model
from d2moe.engine.generate import generate, Request, GenerationStats
from d2moe.engine.sampling import SamplingParams
path, budget, bits, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = open_model(path, budget)
ids = tuple(m.require_tokenizer().encode("The capital of France is", add_special_tokens=False).ids)
st = GenerationStats()
toks = list(generate(m, Request(ids, SamplingParams(max_tokens=n, stop_on_eos=False), bits), st))
print(json.dumps({
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "cache_peak": m.cache.stats.peak_bytes, "budget": budget, "dense_bytes": m.dense_bytes,
    "bytes_read": m.reader.stats.bytes_read, "misses": m.cache.stats.misses,
    "decode_tokens_per_s": st.decode_tokens_per_second,
    "text": m.require_tokenizer().decode(toks),
}))
"""


def run(model: str, budget: int, bits: int, tokens: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(budget), str(bits), str(tokens)], capture_output=True, text=True
    )
    if r.returncode:
        raise RuntimeError(r.stderr)
    return json.loads(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="peak RSS under a memory budget")
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25])
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default="results/memory.json")
    args = ap.parse_args(argv)
    info = json.loads(
        subprocess.run(
            [sys.executable, "-m", "d2moe.cli", "info", "--json", "--model", args.model], capture_output=True, text=True
        ).stdout
    )
    int8 = info["expert_bytes"]["8"]
    one_expert = int8 // (info["moe_layers"] * info["experts"])
    rows = []
    for label, budget in [("one expert", one_expert)] + [(f"{f:g} x int8 experts", int(int8 * f)) for f in args.fractions]:
        res = run(args.model, budget, args.bits, args.tokens)
        res["label"] = label
        res["overhead"] = res["peak_rss"] - res["budget"] - res["dense_bytes"]
        rows.append(res)
        print(
            f"{label:>22}: budget {budget / 2**20:7.1f} MiB, cache peak {res['cache_peak'] / 2**20:7.1f} MiB, "
            f"peak RSS {res['peak_rss'] / 2**20:7.1f} MiB (dense {res['dense_bytes'] / 2**20:.1f} MiB, "
            f"overhead {res['overhead'] / 2**20:.1f} MiB), read {res['bytes_read'] / 2**20:.1f} MiB, "
            f"{res['decode_tokens_per_s']:.1f} tok/s"
        )
    out = write_result(args.out, "memory", {"model": args.model, "int8_expert_bytes": int8, "runs": rows})
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
