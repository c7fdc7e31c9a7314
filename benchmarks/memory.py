"""Peak memory of a generation under a whole-model `--memory-budget`, each run a fresh process in a memory
cgroup (page cache counted) of the budget + the fixed cost of the process (interpreter, torch, tokenizer).

Checks the budget claim: peak RSS <= budget + a fixed overhead, measured per run, and the cgroup never kills
the run. Budgets: dense weights + a fraction of the INT8 experts + room for KV cache and scratch.

    python -m benchmarks.memory [--model PATH] [--fractions 1 0.25 0.1] [--bits 8] [--out results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks.cgroup import available, run_limited
from benchmarks.common import write_result
from d2moe.default_model.paths import default_model_dir

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(2)
from d2moe.config import EngineConfig
from d2moe.engine.model import open_model
from d2moe.engine.generate import generate, Request, GenerationStats
from d2moe.engine.sampling import SamplingParams
path, budget, bits, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = open_model(path, EngineConfig(memory_budget=budget, context=64, step_tokens=16))
ids = tuple(m.require_tokenizer().encode("The capital of France is", add_special_tokens=False).ids)
st = GenerationStats()
toks = list(generate(m, Request(ids, SamplingParams(max_tokens=n, stop_on_eos=False), bits), st))
print(json.dumps({
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "cache_peak": m.cache.arena.peak_bytes, "budget": budget, "dense_bytes": m.dense_bytes,
    "bytes_read": m.expert_bytes_read(), "misses": m.cache.stats.misses,
    "decode_tokens_per_s": st.decode_tokens_per_second,
    "text": m.require_tokenizer().decode(toks),
}))
"""


KV_AND_SCRATCH = 4 * 2**20  # context 64: KV cache + one step's activations, with room


def run(model: str, budget: int, bits: int, tokens: int, cgroup_extra: int) -> dict:
    """One fresh process; under a memory cgroup (page cache counted) of budget + `cgroup_extra` when the
    machine allows it (root, cgroups v1), with its peak beside the process's own peak RSS."""
    cmd = [sys.executable, "-c", CHILD, model, str(budget), str(bits), str(tokens)]
    if available():  # the reason it cannot: no cgroup, report the process's own peak only
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        return json.loads(r.stdout)
    r = run_limited(cmd, budget + cgroup_extra, name="memory", cold=True)
    if r.returncode:
        raise RuntimeError(f"killed for memory: {r.killed_for_memory}; {r.stderr[-2000:]}")
    return json.loads(r.stdout) | {"cgroup_limit": budget + cgroup_extra, "cgroup_peak": r.peak_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="peak RSS under a memory budget")
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25, 0.1])
    ap.add_argument("--cgroup-extra", type=int, default=320 * 2**20,
                    help="bytes the cgroup allows beyond the budget: the process's fixed cost (default 320 MiB)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default="results/memory.json")
    args = ap.parse_args(argv)
    info = json.loads(
        subprocess.run(
            [sys.executable, "-m", "d2moe.cli", "info", "--json", "--model", args.model], capture_output=True, text=True
        ).stdout
    )
    int8, dense = info["expert_bytes"]["8"], info["dense_bytes"]
    rows = []
    for f in args.fractions:  # the whole-model budget: dense + f x the INT8 experts + KV and scratch
        budget = dense + int(int8 * f) + KV_AND_SCRATCH
        res = run(args.model, budget, args.bits, args.tokens, args.cgroup_extra)
        res["label"] = f"{f:g} x int8 experts"
        res["overhead"] = res["peak_rss"] - res["budget"]
        rows.append(res)
        cg = (f", cgroup peak {res['cgroup_peak'] / 2**20:.1f} of {res['cgroup_limit'] / 2**20:.1f} MiB"
              if "cgroup_peak" in res else "")
        print(f"{res['label']:>18}: budget {budget / 2**20:6.1f} MiB, expert arena peak {res['cache_peak'] / 2**20:5.1f}"
              f" MiB, peak RSS {res['peak_rss'] / 2**20:6.1f} MiB (budget + {res['overhead'] / 2**20:.1f} MiB fixed)"
              f"{cg}, read {res['bytes_read'] / 2**20:.1f} MiB, {res['decode_tokens_per_s']:.1f} tok/s")
    out = write_result(args.out, "memory", {"model": args.model, "int8_expert_bytes": int8, "runs": rows})
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
