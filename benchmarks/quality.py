"""Perplexity vs bits for msb, residual and gptq stores of one checkpoint, with the fp32 references beside them.

Rows: dense fp32 SmolLM2 (from the GGUF), the unquantized MoE (fp32 experts), then each store at 2..8 bits
with the expert bytes it read. Defaults follow the default model's build report: held-out Hamlet, the first
8,192 tokens, windows of 256. gptq calibrates on the other plays' texts (never the evaluation play).

    python benchmarks/quality.py [--checkpoint DIR] [--text FILE] [--bits 2 3 4 8] [--out results/quality.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import write_result
from d2moe.config import MWQ_METHODS, ModelConfig, MWQConfig
from d2moe.convert.convert import convert, reference_decoder
from d2moe.default_model.corpus import calibration_files
from d2moe.default_model.gguf_llama import find_smollm2_gguf, read_gguf_llama
from d2moe.default_model.paths import d2moe_home, default_checkpoint_dir, default_texts_dir
from d2moe.engine.model import open_model
from d2moe.engine.perplexity import perplexity
from d2moe.models.decoder import MoEDecoder
from d2moe.models.expert_provider import TensorExpertProvider


def _ppl(decoder: MoEDecoder, ids: list[int], bits: int, n: int, ctx: int) -> float:
    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        return decoder.forward(x, decoder.new_cache(1, x.shape[1]), bits)

    return perplexity(ids, logits_fn, n, ctx).perplexity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="perplexity vs bits, msb vs residual vs gptq")
    ap.add_argument("--checkpoint", default=str(default_checkpoint_dir()))
    ap.add_argument("--text", default=str(default_texts_dir() / "hamlet_gut.txt"))
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    ap.add_argument("--methods", nargs="+", default=["msb", "residual", "gptq"], choices=MWQ_METHODS)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--dense-dtype", default="float16", choices=["float32", "bfloat16", "float16"],
                    help="storage dtype of the stores' dense matrices (the default model's: float16)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense SmolLM2 row")
    ap.add_argument("--out", default="results/quality.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    ckpt = Path(args.checkpoint)
    work = d2moe_home() / "work"
    rows = []

    def report(row: dict) -> None:
        rows.append(row)
        read = f"{row['expert_bytes_read'] / 2**20:8.1f} MiB" if "expert_bytes_read" in row else ""
        print(f"{row['name']:>16} {row.get('bits', '-'):>4} ppl {row['perplexity']:8.3f} {read}", flush=True)

    ref = reference_decoder(ckpt)
    tok = None
    stores = {}
    for method in args.methods:
        stores[method] = work / f"quality-{ckpt.name}-{method}-{args.dense_dtype}"
        if not (stores[method] / "config.json").is_file():
            texts = None
            if method == "gptq":  # the other plays: never the evaluation text
                texts = [f for f in calibration_files(Path(args.text).parent) if f.resolve() != Path(args.text).resolve()]
            convert(ckpt, stores[method], MWQConfig(method=method), dense_dtype=getattr(torch, args.dense_dtype),
                    overwrite=True, calib_texts=texts)
        tok = open_model(stores[method]).require_tokenizer()
    ids = tok.encode(Path(args.text).read_text(), add_special_tokens=False).ids
    if not args.no_dense and (gguf := find_smollm2_gguf()):
        g = read_gguf_llama(gguf, tokenizer=False)
        dense = MoEDecoder(ModelConfig.from_dict(g.config), g.tensors, TensorExpertProvider({}))
        report({"name": "dense fp32", "perplexity": _ppl(dense, ids, 8, args.max_tokens, args.context)})
    report({"name": "moe fp32", "perplexity": _ppl(ref, ids, 8, args.max_tokens, args.context)})
    del ref
    for method, path in stores.items():
        for bits in sorted(args.bits, reverse=True):
            model = open_model(path)
            ppl = _ppl(model.decoder, ids, bits, args.max_tokens, args.context)
            report({"name": method, "bits": bits, "perplexity": ppl, "expert_bytes_read": model.reader.stats.bytes_read})
    out = write_result(args.out, "quality", {
        "checkpoint": str(ckpt), "dense_dtype": args.dense_dtype, "text": args.text, "max_tokens": args.max_tokens,
        "context": args.context, "rows": rows,
    })
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
