"""A real-weight Mixtral converted by `d2moe convert`: perplexity per width against transformers fp32.

The checkpoint is `benchmarks/checkpoints.py`'s SmolLM2-in-Mixtral (real weights in every expert, random
router). transformers runs it in fp32; d2moe converts it (msb and/or residual) and runs each width. Same
text, same windows (held-out Hamlet, first 8,192 tokens, windows of 256 by default).

    python -m benchmarks.parity [--experts 4] [--top-k 2] [--bits 8 4 2] [--out results/parity.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.checkpoints import build_smollm2_mixtral
from benchmarks.common import write_result
from d2moe.config import MWQConfig
from d2moe.convert.convert import convert
from d2moe.default_model.paths import default_texts_dir
from d2moe.engine.model import open_model
from d2moe.engine.perplexity import perplexity


def text_ids(hf_dir: Path, text: Path) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(text.read_text(), add_special_tokens=False).ids


def transformers_perplexity(hf_dir: Path, ids: list[int], max_tokens: int, context: int) -> float:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return perplexity(ids, lambda x: hf(x).logits, max_tokens, context).perplexity


def store_perplexity(store: Path, ids: list[int], bits: int, max_tokens: int, context: int) -> tuple[float, int]:
    """(perplexity, expert bytes read) of a d2moe store at `bits`, from a fresh open."""
    model = open_model(store)
    dec = model.decoder
    ppl = perplexity(ids, lambda x: dec.forward(x, dec.new_cache(1, x.shape[1]), bits), max_tokens, context)
    return ppl.perplexity, model.reader.stats.bytes_read


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    ap.add_argument("--methods", nargs="+", default=["msb", "residual"], choices=["msb", "residual"])
    ap.add_argument("--text", type=Path, default=default_texts_dir() / "hamlet_gut.txt")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/parity.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="d2moe-parity-") as tmp:
        hf_dir = build_smollm2_mixtral(Path(tmp) / "hf", args.experts, args.top_k)
        ids = text_ids(hf_dir, args.text)
        ref = transformers_perplexity(hf_dir, ids, args.max_tokens, args.context)
        print(f"transformers fp32  ppl {ref:.4f}", flush=True)
        for method in args.methods:
            store = convert(hf_dir, Path(tmp) / f"{method}.d2m", MWQConfig(method=method))
            for bits in sorted(args.bits, reverse=True):
                ppl, read = store_perplexity(store, ids, bits, args.max_tokens, args.context)
                rel = ppl / ref - 1
                rows.append({"method": method, "bits": bits, "perplexity": ppl, "relative_to_fp32": rel,
                             "expert_bytes_read": read})
                print(f"d2moe {method:>8} {bits}-bit ppl {ppl:.4f} ({rel:+.2%})", flush=True)
    out = write_result(args.out, "parity", {
        "checkpoint": f"SmolLM2-135M as Mixtral, {args.experts} experts, top-{args.top_k}",
        "text": args.text.name, "max_tokens": args.max_tokens, "context": args.context,
        "transformers_fp32": ref, "rows": rows,
    })
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
