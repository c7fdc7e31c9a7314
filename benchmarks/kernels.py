"""MWQ expert kernel throughput: GiB/s of stored (compressed) bytes per width, against bf16 F.linear.

    python benchmarks/kernels.py [--out results/kernels.json] [--threads 2] [--tokens 1]

For each expert shape, method and width it times the fast path (d2moe.quant.kernels.expert_ffn) on
  hot:  the same expert again and again (its bytes stay in cache: the kernel's compute speed);
  cold: a pool of copies larger than the last-level cache, one after another (bytes come from DRAM, as
        for an expert cache much larger than L3).
The ceiling is the same SwiGLU expert as three bf16 F.linear calls, timed the same two ways. Figures are
medians of repeats ("best": the fastest call). Other jobs on a shared machine distort them, two threads
most (an OpenMP barrier waits for a descheduled thread): the JSON records the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2moe.config import MWQConfig  # noqa: E402
from d2moe.quant.kernels import expert_ffn, load_kernel  # noqa: E402
from d2moe.quant.mwq import NestedWeight  # noqa: E402
from d2moe.quant.pack import ExpertLayout, PackedMatrix, pack_expert, unpack_expert  # noqa: E402

SHAPES = ((576, 192), (1024, 3584))  # (H, I): the default model's expert, a Mixtral-like bigger one
POOL_BYTES = 256 << 20  # > 4x a 32-64 MiB L3
GIB = float(1 << 30)


def random_nested(out: int, n_in: int, cfg: MWQConfig, g: torch.Generator) -> NestedWeight:
    """Random codes and float16 scalars: the kernel's speed does not depend on how they were fitted."""
    n_g, p = n_in // cfg.group_size, cfg.max_bits - 2

    def fp16(*shape: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=g) * 0.01).half().float()

    return NestedWeight(
        offset=fp16(out, n_g) - 0.005,
        base_scale=fp16(out, n_g),
        base=torch.randint(0, 4, (out, n_in), generator=g, dtype=torch.uint8),
        plane_scales=fp16(p, out, n_g),
        planes=torch.rand(p, out, n_in, generator=g) < 0.5,
    )


def median_time(fn: Callable[[int], object], min_seconds: float, min_reps: int = 7) -> float:
    """Median seconds per call of fn(i), i = 0, 1, ... (after two warm-up calls)."""
    return statistics.median(call_times(fn, min_seconds, min_reps))


def call_times(fn: Callable[[int], object], min_seconds: float, min_reps: int = 7) -> list[float]:
    """Seconds per call of fn(i), i = 0, 1, ... (after two warm-up calls), for at least min_seconds."""
    fn(0)
    fn(1)
    times: list[float] = []
    end = time.perf_counter() + min_seconds
    i = 2
    while len(times) < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
        i += 1
    return times


def bench_shape(h: int, i: int, tokens: int, seconds: float) -> tuple[list[dict], dict]:
    kernel = load_kernel()
    if kernel is None:
        raise SystemExit("the CPU kernel could not be built (see the warning above)")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, h, generator=g)
    rows: list[dict] = []
    for method in ("msb", "residual"):
        layout = ExpertLayout.swiglu(h, i, MWQConfig(method=method))
        blob = pack_expert(layout, {n: random_nested(o, c, layout.cfg, g) for n, o, c in layout.shapes})
        copies = max(2, POOL_BYTES // len(blob))
        pool = torch.frombuffer(bytearray(blob * copies), dtype=torch.uint8)
        for bits in layout.cfg.widths:
            size = layout.prefix_bytes(bits)
            experts: list[dict[str, PackedMatrix]] = [
                unpack_expert(layout, pool[k * len(blob) : (k + 1) * len(blob)], bits) for k in range(copies)
            ]
            hot_t = call_times(lambda _: expert_ffn(x, experts[0], bits, kernel), seconds)
            cold_t = call_times(lambda k: expert_ffn(x, experts[k % copies], bits, kernel), seconds)
            exact = median_time(lambda _: expert_ffn(x, experts[0], bits, kernel, exact=True), seconds)
            hot, cold = statistics.median(hot_t), statistics.median(cold_t)
            rows.append(
                {
                    "H": h, "I": i, "method": method, "bits": bits, "bytes": size,
                    "hot_us": hot * 1e6, "cold_us": cold * 1e6, "hot_exact_us": exact * 1e6,
                    "hot_gib_s": size / hot / GIB, "cold_gib_s": size / cold / GIB,
                    "hot_exact_gib_s": size / exact / GIB,
                    "cold_gweights_s": 3 * h * i / cold / 1e9,
                    "hot_best_gib_s": size / min(hot_t) / GIB, "cold_best_gib_s": size / min(cold_t) / GIB,
                }  # fmt: skip
            )
            print(_row(rows[-1]), flush=True)
    ceiling = bench_bf16(h, i, x, seconds)
    print(_ceiling_row(ceiling), flush=True)
    return rows, ceiling


def bench_bf16(h: int, i: int, x: torch.Tensor, seconds: float) -> dict:
    """Three bf16 F.linear calls (gate, up, down) on bf16 activations: the dense ceiling."""
    size = 3 * h * i * 2
    copies = max(2, POOL_BYTES // size)
    weights = [tuple(torch.randn(o, c).bfloat16() for o, c in ((i, h), (i, h), (h, i))) for _ in range(copies)]
    xb = x.bfloat16()

    def run(k: int) -> torch.Tensor:
        w1, w3, w2 = weights[k % copies]
        return F.linear(F.silu(F.linear(xb, w1)) * F.linear(xb, w3), w2)

    hot_t, cold_t = call_times(lambda _: run(0), seconds), call_times(run, seconds)
    hot, cold = statistics.median(hot_t), statistics.median(cold_t)
    return {
        "H": h, "I": i, "bytes": size, "hot_us": hot * 1e6, "cold_us": cold * 1e6,
        "hot_gib_s": size / hot / GIB, "cold_gib_s": size / cold / GIB, "cold_gweights_s": 3 * h * i / cold / 1e9,
        "hot_best_gib_s": size / min(hot_t) / GIB, "cold_best_gib_s": size / min(cold_t) / GIB,
    }  # fmt: skip


def _row(r: dict) -> str:
    return (
        f"H={r['H']:<5} I={r['I']:<5} {r['method']:<8} {r['bits']}b {r['bytes'] / 1024:9.1f} KiB | "
        f"hot {r['hot_gib_s']:6.2f} GiB/s ({r['hot_us']:8.1f} us) | cold {r['cold_gib_s']:6.2f} GiB/s "
        f"({r['cold_us']:8.1f} us, {r['cold_gweights_s']:5.2f} Gw/s) | exact hot {r['hot_exact_gib_s']:6.2f} GiB/s"
        f" | best hot/cold {r['hot_best_gib_s']:6.2f}/{r['cold_best_gib_s']:6.2f}"
    )


def _ceiling_row(c: dict) -> str:
    return (
        f"H={c['H']:<5} I={c['I']:<5} bf16 F.linear {c['bytes'] / 1024:9.1f} KiB | hot {c['hot_gib_s']:6.2f} GiB/s "
        f"({c['hot_us']:8.1f} us) | cold {c['cold_gib_s']:6.2f} GiB/s ({c['cold_us']:8.1f} us, "
        f"{c['cold_gweights_s']:5.2f} Gw/s) | best hot/cold {c['hot_best_gib_s']:6.2f}/{c['cold_best_gib_s']:6.2f}"
    )


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        cmd = ["git", "rev-parse", "HEAD"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/kernels.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=0.5, help="minimum timing per measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results, ceilings = [], []
    for h, i in SHAPES:
        rows, ceiling = bench_shape(h, i, args.tokens, args.seconds)
        results += rows
        ceilings.append(ceiling)
    report = {
        "benchmark": "kernels",
        "machine": machine(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "config": {"threads": args.threads, "tokens": args.tokens, "group_size": MWQConfig().group_size},
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
        "ceiling_bf16": ceilings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
