"""Memory-starved benchmark: d2moe policies against llama.cpp under the same memory limit, cold caches.

Each run is a fresh process in a memory cgroup (page cache counted) of the model budget plus the engine's
own measured idle overhead (llama.cpp gets the budget + 150 MiB, as its whole process costs ~30 MB),
with drop_caches before it; engines interleave within each repeat; medians are reported. Writes JSON and
plots (tokens/s against budget; a timeline of I/O and compute waits for a few decode steps).

    python -m benchmarks.bench [--model bench8x|mixtral2k] [--fractions 0.25] [--repeats 3] [--tokens 32]
    d2moe bench ...   (the same)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.cgroup import available, run_limited
from benchmarks.common import write_result
from benchmarks.llamacpp import completion_command, find_llamacpp, parse_timings

BENCH_MODELS = ["bench8x", "mixtral2k"]  # the models of benchmarks/models.py with GGUF files for the peer
LLAMA_EXTRA = 150 * 2**20  # llama.cpp's allowance on top of the model budget (the protocol)
# llama.cpp's logger thread outlives exit (ggml-org/llama.cpp#22142) and can lose the timing lines or crash the
# process at exit under load: such a run (no timings, not killed for memory) is rerun at most this many times
LLAMA_RERUNS = 2
TIERS = ("max", "high", "balanced", "fast", "min")
PROMPT = "The history of the city begins with a small settlement on the river, where traders met " * 3


def d2moe_cmd(store: Path, budget: int | None, policy: str, bits: int, tokens: int, prompt_tokens: int,
              extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.bench_child", "--model", str(store), "--policy", policy,
           "--bits", str(bits), "--tokens", str(tokens), "--prompt-tokens", str(prompt_tokens), *extra]
    return cmd + (["--budget", str(budget)] if budget else [])


def estimate_q8_0_bytes(hf: Path) -> int:
    """The Q8_0 file's size without it (no peer): 34 bytes per 32 weights of every matrix, 4 per vector."""
    from safetensors import safe_open

    total = 0
    for shard in sorted(Path(hf).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n * 34 // 32 if len(shape) >= 2 else n * 4
    return total


def idle_overhead(store: Path) -> int:
    """Peak RSS of a d2moe process that imports everything, runs every compute path once on tiny tensors and
    opens no model: the fixed cost. (Its cgroup peak is larger only by reclaimable page cache of libraries.)"""
    r = run_limited([sys.executable, "-m", "benchmarks.bench_child", "--model", str(store), "--idle"], 2**31,
                    name="idle", cold=True, cwd=str(Path(__file__).parents[1]))
    return json.loads(r.stdout)["peak_rss"]


def run_engine(name: str, cmd: list[str], limit: int, parse) -> dict:
    r = run_limited(cmd, limit, name=name.replace(" ", "-"), cwd=str(Path(__file__).parents[1]))
    res = {"engine": name, "limit": limit, "peak_bytes": r.peak_bytes, "killed": r.killed_for_memory,
           "returncode": r.returncode, "seconds": r.seconds}
    if r.returncode == 0:
        res.update(parse(r))
    else:
        res["error"] = r.stderr.strip().splitlines()[-1:] if r.stderr else []
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench8x", choices=BENCH_MODELS,
                    help="a benchmark model (benchmarks/models.py), built on first use")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25], help="budgets as fractions of Q8_0")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--engines", nargs="+",
                    default=["llama.cpp Q8_0", "d2moe 8-bit", "d2moe 4-bit", "lru 8-bit", "edgemoe 8-bit",
                             "hobbit 8-bit", "d2moe 8-bit no-stall"],
                    help="'llama.cpp QUANT', 'POLICY N-bit [no-stall]' or 'POLICY TIER' (a calibrated store; matryoshka-free equals d2moe at one "
                         "fixed width: it differs only when widths change)")
    ap.add_argument("--out", default=None, help="default results/bench_MODEL.json")
    ap.add_argument("--no-timeline", dest="timeline", action="store_false", help="skip the timeline run")
    args = ap.parse_args(argv)
    why = available()
    if why:
        print(f"bench: needs memory cgroups ({why})", file=sys.stderr)
        return 2
    from benchmarks.models import BUILDERS

    out_path = args.out or f"results/bench_{args.model}.json"
    model = BUILDERS[args.model]()
    peer = find_llamacpp()
    if peer is None or "Q8_0" not in model.gguf:
        print("bench: llama.cpp is not built (python -m benchmarks.llamacpp build): skipping the peer", file=sys.stderr)
    q8_bytes = model.gguf["Q8_0"].stat().st_size if "Q8_0" in model.gguf else estimate_q8_0_bytes(model.hf)
    overhead = idle_overhead(model.store)
    print(f"bench: d2moe idle overhead {overhead / 2**20:.0f} MiB; Q8_0 file {q8_bytes / 2**20:.0f} MiB",
          file=sys.stderr)

    def child(r) -> dict:
        return json.loads(r.stdout)

    def llama(r) -> dict:
        return parse_timings(r.stderr)

    rows: list[dict] = []
    for frac in args.fractions:
        budget = int(q8_bytes * frac)
        for rep in range(args.repeats):
            for engine in args.engines:
                if engine.startswith("llama.cpp"):
                    quant = engine.split()[1]
                    if peer is None or quant not in model.gguf:
                        continue
                    cmd = completion_command(peer, model.gguf[quant], PROMPT, args.tokens)
                    res = run_engine(engine, cmd, budget + LLAMA_EXTRA, llama)
                    failed = []
                    while "decode_tokens_per_s" not in res and not res["killed"] and len(failed) < LLAMA_RERUNS:
                        failed.append({k: res.get(k) for k in ("returncode", "seconds", "error")})
                        print(f"bench: {engine}: no timings in its stderr (exit {res['returncode']}): rerun "
                              f"{len(failed)}", file=sys.stderr)
                        res = run_engine(engine, cmd, budget + LLAMA_EXTRA, llama)
                    res.update(reruns=len(failed), failed_attempts=failed)
                else:
                    policy, width = engine.split()[0], engine.split()[1]
                    tier = width if width in TIERS else None  # 'd2moe balanced': router two at that tier
                    bits = 8 if tier else int(width.split("-")[0])
                    extra = (["--no-stall"] if "no-stall" in engine else []) + (["--tier", tier] if tier else [])
                    cmd = d2moe_cmd(model.store, budget, policy, bits, args.tokens, args.prompt_tokens, extra)
                    res = run_engine(engine, cmd, budget + overhead, child)
                res.update(fraction=frac, budget=budget, repeat=rep)
                rows.append(res)
                print(f"bench: {frac:.2f} {engine:>24}: decode {res.get('decode_tokens_per_s', 0):6.2f} tok/s, "
                      f"prefill {res.get('prefill_tokens_per_s', 0):6.1f} tok/s, peak {res['peak_bytes'] / 2**20:5.0f}"
                      f" MiB{' KILLED' if res['killed'] else ''}", file=sys.stderr)
    summary = summarize(rows)
    timeline = None
    if args.timeline:  # one more d2moe run at the first budget, recording I/O and waits
        cmd = d2moe_cmd(model.store, int(q8_bytes * args.fractions[0]), "d2moe", 8, 8, args.prompt_tokens,
                        ["--timeline"])
        timeline = run_engine("d2moe timeline", cmd, int(q8_bytes * args.fractions[0]) + overhead, child)
    out = write_result(out_path, "bench", {"model": args.model, "q8_bytes": q8_bytes,
                                           "d2moe_idle_overhead": overhead, "runs": rows, "summary": summary,
                                           "timeline": timeline})
    plot(out)
    for s in summary:
        print(json.dumps(s))
    return 0


def summarize(rows: list[dict]) -> list[dict]:
    """Medians per (fraction, engine)."""
    out = []
    keys = sorted({(r["fraction"], r["engine"]) for r in rows})
    for frac, engine in keys:
        mine = [r for r in rows if (r["fraction"], r["engine"]) == (frac, engine)]
        ok = [r for r in mine if r["returncode"] == 0]
        s = {"fraction": frac, "engine": engine, "runs": len(mine), "killed": sum(r["killed"] for r in mine)}
        if any("reruns" in r for r in mine):
            s["reruns"] = sum(r.get("reruns", 0) for r in mine)
        for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "decode_bytes_read_per_token",
                  "decode_bytes_needed_per_token", "disk_busy_fraction", "compute_idle_fraction", "peak_bytes"):
            vals = [r[k] for r in ok if r.get(k) is not None]
            if vals:
                s[k] = statistics.median(vals)
        out.append(s)
    return out



def plot(result_path: Path) -> None:
    """results/X.json -> X_tokens.png (decode tok/s per engine and budget) and X_timeline.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (pip install matplotlib): no plots", file=sys.stderr)
        return
    data = json.loads(Path(result_path).read_text())
    summary = data["summary"]
    engines = sorted({s["engine"] for s in summary}, key=lambda e: (not e.startswith("llama"), e))
    fracs = sorted({s["fraction"] for s in summary})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(engines), 1)
    for i, engine in enumerate(engines):
        vals = [next((s.get("decode_tokens_per_s", 0) for s in summary
                      if s["engine"] == engine and s["fraction"] == f), 0) for f in fracs]
        ax.bar([j + i * width for j in range(len(fracs))], vals, width, label=engine)
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(fracs))])
    ax.set_xticklabels([f"{f:.0%} of Q8_0\n({f * data['q8_bytes'] / 2**20:.0f} MiB)" for f in fracs])
    ax.set_ylabel("decode tokens/s (median, cold start)")
    ax.set_title(f"{data['model']}: decode under a memory cgroup")
    ax.legend(fontsize=8)
    fig.tight_layout()
    stem = Path(result_path).with_suffix("")
    fig.savefig(f"{stem}_tokens.png", dpi=120)
    tl = (data.get("timeline") or {}).get("timeline")
    if tl:
        fig, ax = plt.subplots(figsize=(9, 2.6))
        end = max([b for _, b, _ in tl["io"]] + [b for _, b in tl["wait"]] + [0.0])
        ax.broken_barh([(a, b - a) for a, b, _ in tl["io"]], (1.1, 0.8), color="tab:orange", label="disk read")
        ax.broken_barh([(0, end)], (0.1, 0.8), color="tab:blue", label="compute")
        ax.broken_barh([(a, b - a) for a, b in tl["wait"]], (0.1, 0.8), color="white", label="compute waits")
        ax.set_yticks([0.5, 1.5])
        ax.set_yticklabels(["compute", "I/O"])
        ax.set_xlabel("seconds into decode")
        ax.set_title("d2moe decode steps: I/O queue and compute queue")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_timeline.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
