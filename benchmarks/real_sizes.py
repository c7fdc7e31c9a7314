"""What the real checkpoints of each family would be as d2moe stores: parameters, expert bytes per width,
dense bytes and the smallest memory budget, from their published config.json shapes
(benchmarks/real_checkpoints.json; no weights are needed or downloaded), by the same code as
`d2moe info HF_DIR` (d2moe/engine/checkpoint_info.py). Each count is checked against the total its model
card states (within 2 %), which catches a shape copied wrong.

    python -m benchmarks.real_sizes [--context 2048] [--out results/real_sizes.json]

Prints a markdown table (the README's "Model families" sizes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import write_result
from d2moe.engine.checkpoint_info import checkpoint_info

CONFIGS = Path(__file__).with_name("real_checkpoints.json")
TOLERANCE = 0.02  # counted vs published parameters (Llama 4 Scout's 109 B include its vision encoder)


def gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rows, results = [], {}
    for name, entry in json.loads(CONFIGS.read_text()).items():
        if name.startswith("_"):
            continue
        info = checkpoint_info(Path(name), context=args.context, hf=entry["config"])
        off = info["parameters"] / entry["published_params"] - 1
        if abs(off) > TOLERANCE:
            raise SystemExit(f"{name}: counted {info['parameters']:,} parameters, {off:+.1%} off the published "
                             f"{entry['published_params']:,.0f}: a shape in {CONFIGS.name} is wrong")
        results[name] = info
        e, d = info["expert_bytes"], info["dense_bytes"]
        rows.append(f"| {name} | {info['family']} | {gb(info['parameters'])} / {gb(info['active_parameters'])} | "
                    f"{info['experts']} x {info['moe_layers']}, top-{info['top_k']} | "
                    + " / ".join(gb(e[b]) for b in ("2", "3", "4", "8"))
                    + f" | {gb(d['bfloat16'])} / {gb(d['int8'])} | "
                    f"{gb(info['min_memory_budget']['int8'])} |")
    print("| checkpoint | family | params B (total / active) | routed experts | expert GB at 2 / 3 / 4 / 8 bits "
          f"| dense GB (bf16 / int8) | min budget GB (int8 dense, {args.context} ctx) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.out:
        write_result(args.out, "real_sizes", {"context": args.context, "checkpoints": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
