"""Width choice at equal bytes: perplexity against expert bytes per token for router two and its baselines.

Every method runs the same store on the same held-out text (default: the first 8,192 tokens of Hamlet,
which neither the default model's build nor `d2moe calibrate` reads), windows of 256:
- fixed:   every chosen expert at one width (2..8);
- random:  each chosen expert at floor(a) or floor(a)+1 bits at random, averaging a bits;
- hobbit:  HOBBIT's rule, experts of gate weight below a threshold at a low width, the rest at 8;
- edgemoe: EdgeMoE's static per-expert widths from the calibrated sensitivity, at several byte targets;
- router:  router two (d2moe calibrate) at the tiers' prices and a few more points of its price curve;
- oracle:  (not by default) widths chosen with hindsight from the held-out tokens' own second-order costs,
           a bound for any per-token width router (benchmarks/oracle_widths.py).
The x axis is what the chosen widths need (bytes per token, whatever is cached), so methods compare at
equal bytes. Writes JSON and a plot (the Pareto front).

    python -m benchmarks.pareto [--model STORE] [--text FILE] [--tokens 8192] [--out results/pareto_default]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from benchmarks.oracle_widths import OracleRule, oracle_points
from d2moe.config import EngineConfig
from d2moe.default_model.paths import default_model_dir, default_texts_dir
from d2moe.engine.model import LoadedModel, open_model
from d2moe.engine.perplexity import perplexity
from d2moe.models.layers import linear
from d2moe.models.widths import request_widths, static_widths
from d2moe.routing.calibrate import static_widths as static_table
from d2moe.routing.calibration import CALIBRATION_FILE
from d2moe.routing.tiers import PricePoint, interpolate_price


def random_rule(avg: float, seed: int = 0):
    """Each chosen expert at floor(avg) or floor(avg)+1 bits, at random, averaging `avg`."""
    g = torch.Generator().manual_seed(seed)
    lo = math.floor(avg)

    def rule(layer, x, r, token_bits, price):
        up = torch.rand(r.idx.shape, generator=g) < (avg - lo)
        return torch.minimum(request_widths(r.idx, token_bits), lo + up.long())

    return rule


def hobbit_rule(model: LoadedModel, low: int, threshold: float):
    """HOBBIT's precision rule with nothing resident: gate weight below `threshold` -> `low` bits. The gate
    weight is the router's softmax over the chosen experts (a linear-scored router, like the default
    model's, sums its experts with weight 1, which carries no importance)."""

    def rule(layer, x, r, token_bits, price):
        logits = linear(x, model.decoder.w[f"layers.{layer}.router"]).float()  # [T, E]
        gate = logits.gather(1, r.idx).softmax(dim=-1)  # [T, k]
        high = request_widths(r.idx, token_bits)
        return torch.where(gate < threshold, torch.minimum(high, torch.tensor(low)), high)

    return rule


def edgemoe_rule(tables: dict[str, list[int]]):
    t = {int(k): torch.tensor(v) for k, v in tables.items()}
    return lambda layer, x, r, token_bits, price: static_widths(r.idx, token_bits, t[layer])


def evaluate(model: LoadedModel, ids: list[int], tokens: int, context: int, rule, price: float | None) -> dict:
    """Perplexity with `rule` as the width rule (None: the model's own, router two when priced)."""
    own = model.decoder.widths
    if rule is not None:
        model.decoder.widths = rule
    model.decoder.width_hist.zero_()
    try:
        def logits_fn(x: torch.Tensor) -> torch.Tensor:
            return model.decoder.forward(x, model.decoder.new_cache(1, x.shape[1]), model.reader.max_bits,
                                         price=price)

        t0 = time.perf_counter()
        res = perplexity(ids, logits_fn, tokens, context)
        report = model.widths_report(res.tokens)
    finally:
        model.decoder.widths = own
    return {"perplexity": res.perplexity, "avg_bits": report["avg_bits"],
            "expert_bytes_per_token": report["expert_bytes_per_token"], "seconds": time.perf_counter() - t0}


def plan(model: LoadedModel, cal: dict | None) -> list[tuple[str, str, object, float | None]]:
    """(method, setting, rule or None, price) for every point of the benchmark."""
    points: list[tuple[str, str, object, float | None]] = [("fixed", f"{b} bits", None, None) for b in range(2, 9)]
    points += [("random", f"avg {a}", random_rule(a), None) for a in (3.5, 4.5, 5.5)]
    k = model.config.top_k
    points += [("hobbit", f"gate < {t:.2f} -> {low} bits", hobbit_rule(model, low, t), None)
               for low in (3, 4) for t in (0.5 / k, 1.0 / k)]
    if cal is not None:
        widths, frac = cal["widths"], cal["byte_frac"]
        points += [("edgemoe", f"{int(100 * f)} % bytes", edgemoe_rule(static_table(cal["experts"], widths, frac, f)),
                    None) for f in (0.3, 0.5, 0.75)]
        curve = [PricePoint(**p) for p in cal["price_curve"]]
        for tier in ("high", "balanced", "fast"):
            points.append(("router", tier, None, cal["tiers"][tier]["price"]))
        for f in (0.4, 0.6, 0.9):
            points.append(("router", f"{int(100 * f)} % bytes", None, interpolate_price(curve, "byte_frac", f)))
    return points


def _group(row: dict) -> str:
    """One plotted line per method (the oracle: one per floor width)."""
    return row["method"] if row["method"] != "oracle" else "oracle, " + row["setting"].split(",")[0]


def plot(rows: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e .[bench])")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(_group(r) for r in rows):
        pts = sorted((r["expert_bytes_per_token"] / 2**20, r["perplexity"]) for r in rows if _group(r) == method)
        ax.plot(*zip(*pts), marker="o", label=method, linestyle="-" if method in ("router", "fixed") else ":")
    ax.set_xlabel("expert bytes per token (MiB) the chosen widths need")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="perplexity vs expert bytes: router two and baselines")
    ap.add_argument("--model", default=None, help="store (default: the built-in model)")
    ap.add_argument("--text", default=None, help="held-out text (default: Hamlet)")
    ap.add_argument("--tokens", type=int, default=8192,
                    help="held-out tokens (at 1,024-2,048 a change of widths moves perplexity a few %% either way "
                         "by chance, as much as the differences measured)")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["fixed", "random", "hobbit", "edgemoe", "router"],
                    choices=["fixed", "random", "hobbit", "edgemoe", "router", "oracle"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/pareto_default")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from --out's JSON")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of methods not run now from an earlier --out JSON (same text and tokens)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.plot_only:
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        plot(data["rows"], Path(args.out).with_suffix(".png"), f"{Path(data['model']).name}: {data['text']}, "
             f"{data['tokens']} tokens")
        return 0
    store = Path(args.model) if args.model else default_model_dir()
    text = Path(args.text) if args.text else default_texts_dir() / "hamlet_gut.txt"
    cal_file = store / CALIBRATION_FILE
    cal = json.loads(cal_file.read_text()) if cal_file.is_file() else None
    if cal is None:
        print(f"{store}: no calibration (run `d2moe calibrate`); router and edgemoe rows skipped")
    rows = []
    out = Path(args.out)
    if args.append and out.with_suffix(".json").is_file():
        rows = [r for r in json.loads(out.with_suffix(".json").read_text())["rows"] if r["method"] not in args.methods]
    with open_model(store, EngineConfig(context=args.context, full_logits=True)) as model:
        ids = model.require_tokenizer().encode(text.read_text(encoding="utf-8", errors="replace"),
                                               add_special_tokens=False).ids
        full = model.reader.config.layout.prefix_bytes(model.reader.max_bits)
        todo = [p for p in plan(model, cal) if p[0] in args.methods]
        if "oracle" in args.methods:
            print("oracle: pricing every width of every chosen expert on the held-out tokens", flush=True)
            todo += oracle_points(model, ids, args.tokens, args.context)
        for method, setting, rule, price in sorted(todo, key=lambda p: args.methods.index(p[0])):
            bits = int(setting.split()[0]) if method == "fixed" else None
            if bits is not None:
                rule = lambda layer, x, r, token_bits, price, b=bits: torch.full_like(r.idx, b)
            row = {"method": method, "setting": setting, **evaluate(model, ids, args.tokens, args.context, rule, price)}
            if isinstance(rule, OracleRule):  # experts the quantized run chose where the widest model did not
                row["unmatched"] = rule.unmatched / max(rule.total, 1)
            row["byte_frac"] = row["expert_bytes_per_token"] / (full * len(model.config.moe_layers) * model.config.top_k)
            rows.append(row)
            print(f"{method:>8} {setting:>16}: ppl {row['perplexity']:8.3f}  {row['avg_bits']:.2f} bits  "
                  f"{row['expert_bytes_per_token'] / 2**20:6.2f} MiB/token ({100 * row['byte_frac']:.0f} %)", flush=True)
    meta = {"model": str(store), "text": text.name, "tokens": args.tokens, "context": args.context,
            "calibration": cal and {k: cal[k] for k in ("sources", "tokens", "tiers") if k in cal}}
    write_result(out.with_suffix(".json"), "pareto", {**meta, "rows": rows})
    print(f"wrote {out.with_suffix('.json')}")
    if plot(rows, out.with_suffix(".png"), f"{store.name}: {text.name}, {args.tokens} tokens"):
        print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
