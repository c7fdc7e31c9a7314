"""`d2moe run | eval | info | convert | build-default`: results on stdout, logs and progress on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("d2moe")


def _model_path(args: argparse.Namespace) -> Path:
    from d2moe.default_model.paths import default_model_dir

    if args.model is not None:
        return Path(args.model)
    path = default_model_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the built-in default model is not built yet ({path}); run `bash scripts/setup.sh` "
            "or `d2moe build-default`, or pass --model PATH"
        )
    return path


def _budget(text: str | None) -> int | None:
    from d2moe.util.sizes import parse_size

    return None if text is None else parse_size(text)


def _bits(value: str) -> int:
    bits = int(value)
    if not 2 <= bits <= 8:
        raise argparse.ArgumentTypeError("bits must be between 2 and 8")
    return bits


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _set_threads(args: argparse.Namespace) -> None:
    """Compute threads for torch and the expert kernel. Their OpenMP regions wait at barriers, so a thread
    that loses its core to another process stalls every step: on a busy machine fewer threads is faster."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def cmd_run(args: argparse.Namespace) -> int:
    from d2moe.engine.generate import GenerationStats, Request, generate
    from d2moe.engine.model import open_model
    from d2moe.engine.sampling import SamplingParams

    budget = _budget(args.memory_budget)
    _set_threads(args)
    model = open_model(_model_path(args), budget)
    tok = model.require_tokenizer()
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    params = SamplingParams(args.max_tokens, args.temperature, args.top_p, args.seed)
    stats = GenerationStats()
    out: list[int] = []
    printed = ""
    for token in generate(model, Request(tuple(ids), params, args.bits), stats):
        out.append(token)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):  # hold back incomplete UTF-8 sequences
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(out)[len(printed) :] + "\n")
    c = model.cache.stats
    log.info(
        "%d prompt + %d generated tokens; prefill %.2fs, decode %.1f tok/s; %d-bit experts, "
        "cache peak %.1f MiB of %.1f MiB budget, %d misses, %.1f MiB read",
        stats.prompt_tokens,
        stats.generated_tokens,
        stats.prefill_seconds,
        stats.decode_tokens_per_second,
        args.bits,
        c.peak_bytes / 2**20,
        model.cache.budget_bytes / 2**20,
        c.misses,
        model.reader.stats.bytes_read / 2**20,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from d2moe.engine.model import open_model
    from d2moe.engine.perplexity import perplexity

    text_path = Path(args.text)
    try:
        text = text_path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise FileNotFoundError(f"{text_path}: cannot read ({e.strerror})") from None
    budget = _budget(args.memory_budget)
    _set_threads(args)
    model = open_model(_model_path(args), budget)
    model.provider.check_budget(args.bits)
    ids = model.require_tokenizer().encode(text, add_special_tokens=False).ids
    bar = tqdm(total=min(len(ids), args.max_tokens), unit="tok", desc="eval", disable=args.quiet, leave=False)

    def logits_fn(x):
        cache = model.decoder.new_cache(1, x.shape[1])
        return model.decoder.forward(x, cache, args.bits)

    t0 = time.perf_counter()
    res = perplexity(ids, logits_fn, args.max_tokens, args.context, bar.update)
    bar.close()
    result = {
        "perplexity": res.perplexity,
        "nll": res.nll,
        "tokens": res.tokens,
        "predicted_tokens": res.predicted,
        "windows": res.windows,
        "context": args.context,
        "bits": args.bits,
        "mwq": model.reader.config.mwq.method,
        "expert_bytes_read": model.reader.stats.bytes_read,
        "memory_budget": model.cache.budget_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
        "text": str(text_path),
        "model": str(model.path),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {res.perplexity:.3f} over {res.predicted} predicted tokens ({args.bits}-bit experts)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from d2moe.engine.model import open_model

    model = open_model(_model_path(args))
    r, cfg = model.reader, model.config
    info = {
        "model": str(model.path),
        "family": cfg.family,
        "layers": cfg.num_layers,
        "moe_layers": len(cfg.moe_layers),
        "experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "mwq": {"method": r.config.mwq.method, "group_size": r.config.mwq.group_size},
        "expert_bytes": {str(b): r.total_expert_bytes(b) for b in r.config.mwq.widths},
        "dense_bytes": model.dense_bytes,
        "experts_file_bytes": r.file_bytes(),
    }
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from d2moe.config import MWQConfig
    from d2moe.convert.convert import convert

    mwq = MWQConfig(group_size=args.group_size, method=args.mwq)
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dense_dtype
    ]
    t0 = time.perf_counter()
    out = convert(Path(args.hf_dir), Path(args.out_dir), mwq, dense_dtype=dtype, overwrite=args.force)
    log.info("converted %s -> %s in %.1fs", args.hf_dir, out, time.perf_counter() - t0)
    print(out)
    return 0


def cmd_build_default(args: argparse.Namespace) -> int:
    from d2moe.default_model.setup import ensure_default_model

    print(ensure_default_model(force=args.force))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2moe", description="Serve MoE language models from a bit-nested store.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def model_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default=None, help="store directory (default: the built-in model)")

    def threads_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--threads", type=_positive, default=None,
                        help="compute threads (default: torch's, one per core); use fewer on a busy machine")

    run = sub.add_parser("run", help="generate a completion for a prompt")
    model_arg(run)
    run.add_argument("prompt")
    run.add_argument("--max-tokens", type=int, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--bits", type=_bits, default=8, help="expert bit-width, 2..8")
    run.add_argument("--memory-budget", default=None, help="bytes of experts held in memory, e.g. 64MiB")
    threads_arg(run)
    run.set_defaults(fn=cmd_run)

    ev = sub.add_parser("eval", help="held-out perplexity of a text file")
    model_arg(ev)
    ev.add_argument("--text", required=True)
    ev.add_argument("--bits", type=_bits, default=8)
    ev.add_argument("--max-tokens", type=int, default=8192, help="first N tokens of the file")
    ev.add_argument("--context", type=int, default=512, help="window length (non-overlapping)")
    ev.add_argument("--memory-budget", default=None)
    threads_arg(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(fn=cmd_eval)

    info = sub.add_parser("info", help="sizes of a store")
    model_arg(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(fn=cmd_info)

    cv = sub.add_parser("convert", help="Hugging Face checkpoint -> bit-nested store")
    cv.add_argument("hf_dir")
    cv.add_argument("out_dir")
    cv.add_argument("--group-size", type=int, default=64)
    cv.add_argument("--mwq", choices=("msb", "residual"), default="msb")
    cv.add_argument(
        "--dense-dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="storage dtype of dense matrices (auto: as in the checkpoint; float16 is fastest on CPU, bfloat16 "
        "has fp32's range); norms and biases stay float32",
    )
    cv.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    cv.set_defaults(fn=cmd_convert)

    bd = sub.add_parser("build-default", help="build the built-in default model (MoEfied SmolLM2)")
    bd.add_argument("--force", action="store_true", help="rebuild even if built")
    bd.set_defaults(fn=cmd_build_default)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="d2moe: %(message)s", stream=sys.stderr
    )
    from d2moe.errors import USER_ERRORS

    try:
        return args.fn(args)
    except USER_ERRORS as e:
        print(f"d2moe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("d2moe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
