"""`d2moe run | serve | chat | eval | info | convert | export | build-default`: results on stdout, logs and
progress on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from d2moe.cli_args import bits as _bits
from d2moe.cli_args import milliseconds as _positive_ms
from d2moe.cli_args import non_negative as _non_negative
from d2moe.cli_args import positive as _positive
from d2moe.cli_args import seconds as _seconds
from d2moe.cli_args import threads as _threads

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


def _set_threads(args: argparse.Namespace) -> None:
    """Compute threads for torch and the expert kernel. Their OpenMP regions wait at barriers, so a thread
    that loses its core to another process stalls every step: on a busy machine fewer threads is faster.
    `auto` leaves torch's count as the most and lets the engine choose per step (engine/threads.py)."""
    if args.threads is not None and args.threads != "auto":
        import torch

        torch.set_num_threads(args.threads)


def _engine(args: argparse.Namespace, context: int, step_tokens: int, full_logits: bool = False, kv_slots: int = 1,
            prefix_cache: int = 0):
    from d2moe.config import EngineConfig

    return EngineConfig(
        memory_budget=_budget(args.memory_budget),
        context=context,
        kv_slots=kv_slots,
        prefix_cache=prefix_cache,
        step_tokens=step_tokens,
        full_logits=full_logits,
        policy=args.policy,
        prefetch=not args.no_prefetch,
        max_wait=0.0 if args.no_stall else None,
        loader_threads=args.loader_threads,
        adaptive_threads=args.threads == "auto",
    )


def _report(model, seconds: float | None = None) -> dict:
    """What the engine did, for logs and --json: the memory split, bytes read, cache and pipeline stats."""
    from dataclasses import asdict

    out = {"memory": asdict(model.plan), "policy": model.engine.policy, "expert_bytes_read": model.expert_bytes_read()}
    stats = model.cache.stats
    out["cache"] = {"hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions}
    provider = getattr(model.provider, "stats", None)
    if provider is not None:
        out["io_wait_seconds"] = round(provider.io_wait_seconds, 4)
        out["loader"] = model.provider.loader.mode
        out["degraded"] = {f"{want}->{have}": n for (want, have), n in sorted(provider.degraded.items())}
        out["warmed_layers"] = provider.warmed
        rates = provider.prediction_hit_rate()
        if rates:
            out["prefetch_hit_rate"] = round(sum(rates.values()) / len(rates), 4)
    return out


def _choice_text(choice, args) -> str:
    if args.tier is None and args.avg_bits is None:
        return f"{choice.bits}-bit experts"
    what = f"tier {args.tier}" if args.tier else f"--avg-bits {args.avg_bits}"
    return f"{what}: " + (f"router two at price {choice.price:.3g}" if choice.routed else f"{choice.bits}-bit experts")


def cmd_run(args: argparse.Namespace) -> int:
    from d2moe.engine.generate import GenerationStats, Request, generate
    from d2moe.engine.model import load_tokenizer, open_model
    from d2moe.engine.sampling import SamplingParams
    from d2moe.storage.format import StoreError, load_store_config

    _budget(args.memory_budget)  # bad sizes are reported before anything is opened
    _set_threads(args)
    path = _model_path(args)
    load_store_config(path)  # a clear error for a directory that is not a store
    tok = load_tokenizer(path)
    if tok is None:
        raise StoreError(f"{path}: no tokenizer.json in the store; convert from a checkpoint that has one")
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    params = SamplingParams(args.max_tokens, args.temperature, args.top_p, args.seed)
    stats = GenerationStats()
    out: list[int] = []
    printed = ""
    with open_model(path, _engine(args, len(ids) + args.max_tokens, max(len(ids), 1))) as model:
        log.info("%s; policy %s", model.plan.describe(), args.policy)
        choice = model.width_choice(args.bits, args.tier, args.avg_bits)
        log.info("%s", _choice_text(choice, args))
        request = Request(tuple(ids), params, choice.bits, choice.price, deadline=args.deadline)
        for token in generate(model, request, stats):
            out.append(token)
            text = tok.decode(out)
            if not text.endswith("\ufffd"):  # hold back incomplete UTF-8 sequences
                sys.stdout.write(text[len(printed) :])
                sys.stdout.flush()
                printed = text
        sys.stdout.write(tok.decode(out)[len(printed) :] + "\n")
        rep = _report(model)
        widths = model.widths_report(stats.prompt_tokens + stats.generated_tokens)
    c = rep["cache"]
    extra = ""
    if "loader" in rep:
        extra = f", I/O wait {rep['io_wait_seconds']:.2f}s ({rep['loader']})"
        if rep["degraded"]:
            extra += f", degraded {rep['degraded']}"
        if "prefetch_hit_rate" in rep:
            extra += f", next-layer prediction {100 * rep['prefetch_hit_rate']:.0f}%"
    log.info(
        "%d prompt + %d generated tokens; prefill %.2fs, decode %.1f tok/s; experts at %.2f bits on average; "
        "%d hits, %d misses, %.1f MiB read%s",
        stats.prompt_tokens, stats.generated_tokens, stats.prefill_seconds, stats.decode_tokens_per_second,
        widths["avg_bits"] or 0.0, c["hits"], c["misses"], rep["expert_bytes_read"] / 2**20, extra,
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from d2moe.engine.model import open_model
    from d2moe.engine.perplexity import perplexity, stepwise_logits

    if args.deadline is not None and not args.stepwise:
        raise ValueError("--deadline applies to decode steps: add --stepwise")
    text_path = Path(args.text)
    try:
        text = text_path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise FileNotFoundError(f"{text_path}: cannot read ({e.strerror})") from None
    _set_threads(args)
    with open_model(_model_path(args), _engine(args, args.context, args.context, full_logits=True)) as model:
        choice = model.width_choice(args.bits, args.tier, args.avg_bits)
        model.provider.check_budget(choice.bits)
        ids = model.require_tokenizer().encode(text, add_special_tokens=False).ids
        bar = tqdm(total=min(len(ids), args.max_tokens), unit="tok", desc="eval", disable=args.quiet, leave=False)

        def logits_fn(x):
            cache = model.decoder.new_cache(1, x.shape[1])
            if not args.stepwise:
                return model.decoder.forward(x, cache, choice.bits, price=choice.price)
            return stepwise_logits(model, x, cache, choice.bits, choice.price, args.deadline)

        t0 = time.perf_counter()
        res = perplexity(ids, logits_fn, args.max_tokens, args.context, bar.update)
        bar.close()
        rep = _report(model)
        widths = model.widths_report(res.tokens)
    result = {
        "perplexity": res.perplexity,
        "nll": res.nll,
        "tokens": res.tokens,
        "predicted_tokens": res.predicted,
        "windows": res.windows,
        "context": args.context,
        "bits": choice.bits,
        "tier": args.tier,
        "price": choice.price,
        "avg_bits": widths["avg_bits"],
        "expert_bytes_per_token": widths["expert_bytes_per_token"],
        "widths": widths["widths"],
        "mwq": model.reader.config.mwq.method,
        "expert_bytes_read": rep["expert_bytes_read"],
        "memory_budget": model.plan.budget,
        "seconds": round(time.perf_counter() - t0, 3),
        "stepwise": args.stepwise,
        "deadline_ms": None if args.deadline is None else args.deadline * 1e3,
        "text": str(text_path),
        "model": str(model.path),
        "engine": rep,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {res.perplexity:.3f} over {res.predicted} predicted tokens ({_choice_text(choice, args)}; "
              f"{widths['avg_bits']:.2f} bits and {widths['expert_bytes_per_token'] / 2**20:.2f} MiB of experts per token)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from d2moe.engine.model import open_model
    from d2moe.routing.calibrate import calibrate
    from d2moe.routing.finetune import FinetuneConfig
    from d2moe.routing.fit import FitConfig

    texts = []
    for name in args.text:
        try:
            texts.append(Path(name).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise FileNotFoundError(f"{name}: cannot read ({e.strerror})") from None
    _set_threads(args)
    with open_model(_model_path(args)) as model:
        tok = model.require_tokenizer()
        ids = [i for t in texts for i in tok.encode(t, add_special_tokens=False).ids]
        n_windows = min(len(ids), args.tokens) // args.context
        layers = len(model.config.moe_layers)
        bars = {
            "windows": tqdm(total=n_windows, desc="calibrate: run", unit="win", disable=args.quiet, leave=False),
            "layers": tqdm(total=layers, desc="calibrate: price widths", unit="layer", disable=args.quiet, leave=False),
            "fit": tqdm(total=layers, desc="calibrate: fit router two", unit="layer", disable=args.quiet, leave=False),
            "guess": tqdm(total=max(layers - 1, 0), desc="calibrate: fit the next-layer guess", unit="layer",
                          disable=args.quiet, leave=False),
            "finetune": tqdm(total=args.finetune_steps, desc="calibrate: fine-tune on KL", unit="step",
                             disable=args.quiet, leave=False),
        }
        summary = calibrate(model, ids, tokens=args.tokens, context=args.context, fit=FitConfig(steps=args.steps),
                            tune=FinetuneConfig(steps=args.finetune_steps),
                            sources=[Path(t).name for t in args.text], progress=lambda what, n: bars[what].update(n))
        for bar in bars.values():
            bar.close()
    tiers = ", ".join(f"{t} {v['avg_bits']:.2f} bits ({100 * v['byte_frac']:.0f} % bytes)"
                      for t, v in summary["tiers"].items())
    print(f"calibrated {model.path} on {summary['tokens']} tokens in {summary['seconds']:.0f}s: {tiers}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from d2moe.engine.checkpoint_info import checkpoint_info, format_checkpoint_info, is_store_config, read_hf_config
    from d2moe.engine.store_info import format_info, store_info

    path = _model_path(args)
    if path.is_file() or not is_store_config(read_hf_config(path)):  # a Hugging Face checkpoint: what it would be
        info = checkpoint_info(path, context=args.context, group_size=args.group_size)
        print(json.dumps(info) if args.json else format_checkpoint_info(info))
        return 0
    info = store_info(path, context=args.context)
    print(json.dumps(info) if args.json else format_info(info))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from d2moe.config import MWQConfig
    from d2moe.convert.convert import convert

    texts = [Path(t) for t in args.calib_text or ()]
    method = args.mwq
    mwq = MWQConfig(group_size=args.group_size, method=method)
    dtype = {
        "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
        "int8": torch.int8,
    }[args.dense_dtype]
    t0 = time.perf_counter()
    out = convert(Path(args.hf_dir), Path(args.out_dir), mwq, dense_dtype=dtype, overwrite=args.force,
                  calib_texts=texts, calib_tokens=args.calib_tokens)
    log.info("converted %s -> %s (--mwq %s) in %.1fs", args.hf_dir, out, method, time.perf_counter() - t0)
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from d2moe.export import export

    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    t0 = time.perf_counter()
    out = export(Path(args.store), Path(args.out), bits=args.bits, fmt=args.format, dtype=dtype,
                 hf_config=Path(args.hf_config) if args.hf_config else None)
    log.info("exported %s -> %s (%s) in %.1fs", args.store, out, args.format, time.perf_counter() - t0)
    print(out)
    return 0


def cmd_bench(bench_args: list[str]) -> int:
    """Run benchmarks/bench.py from the source tree (benchmarks are not part of an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "bench.py").is_file():
        print(f"d2moe: error: {root}/benchmarks not found; `d2moe bench` runs from a source checkout",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks.bench", *bench_args], cwd=root)


def _serving(args: argparse.Namespace):
    """The store, its engine config (KV for every slot) and the batcher config, for serve and chat."""
    from d2moe.engine.batcher import BatcherConfig
    from d2moe.storage.format import load_store_config

    _budget(args.memory_budget)
    _set_threads(args)
    path = _model_path(args)
    store = load_store_config(path)
    context = min(args.context, store.model.max_position)
    batcher = BatcherConfig(args.max_batch, args.prefill_chunk, max(args.prefill_chunk + args.max_batch, 1))
    prefix = context if args.prefix_cache is None else args.prefix_cache
    engine = _engine(args, context, batcher.max_step_tokens, kv_slots=args.max_batch, prefix_cache=prefix)
    return path, engine, batcher


def _require(*modules: str) -> None:
    import importlib.util

    from d2moe.errors import MissingDependency

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(f"{', '.join(missing)} not installed: pip install 'd2moe[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _require("fastapi", "uvicorn", "pydantic", "jinja2")
    from d2moe.server.app import ServerConfig
    from d2moe.server.serve import serve

    path, engine, batcher = _serving(args)
    name = args.model_name or path.resolve().name
    config = ServerConfig(args.host, args.port, args.api_key, args.max_batch, args.max_queue, args.request_timeout,
                          model_name=name)
    return serve(path, engine, batcher, config)


def cmd_chat(args: argparse.Namespace) -> int:
    from d2moe.chat import ChatConfig, chat_session
    from d2moe.engine.chat_template import load_chat_template
    from d2moe.engine.engine import Engine
    from d2moe.engine.loop import EngineLoop
    from d2moe.engine.model import open_model
    from d2moe.storage.format import StoreError

    _require("jinja2")
    args.max_batch = 1
    path, engine_cfg, batcher = _serving(args)
    template = load_chat_template(path)
    if template is None:
        raise StoreError(f"{path}: the store has no chat template (tokenizer_config.json chat_template); "
                         "use `d2moe run`")
    with open_model(path, engine_cfg) as model:
        log.info("%s; policy %s", model.plan.describe(), args.policy)
        choice = model.width_choice(args.bits, args.tier, args.avg_bits)
        log.info("%s", _choice_text(choice, args))
        cfg = ChatConfig(choice.bits, choice.price, args.max_tokens, args.temperature, args.top_p, args.system)
        with EngineLoop(Engine(model, batcher, engine_cfg.context)) as loop:
            return chat_session(loop, template, cfg)


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

    def threads_arg(sp: argparse.ArgumentParser, auto: bool = False) -> None:
        if auto:
            sp.add_argument("--threads", type=_threads, default=None,
                            help="compute threads (default: torch's, one per core), or auto: the engine measures "
                                 "its steps and runs each at the count that is fastest now (1, half or all cores; "
                                 "for a machine other programs also use)")
            return
        sp.add_argument("--threads", type=_positive, default=None,
                        help="compute threads (default: torch's, one per core); use fewer on a busy machine")

    def engine_args(sp: argparse.ArgumentParser) -> None:
        from d2moe.engine.policies import POLICIES

        sp.add_argument("--memory-budget", default=None,
                        help="everything the model holds (dense weights, KV cache, scratch, expert cache), e.g. "
                             "192MiB; default: room for every expert at 8 bits")
        sp.add_argument("--policy", choices=POLICIES, default="d2moe",
                        help="d2moe: pipelined HEBF loads, plane cache, prefetch (default); lru: synchronous "
                             "reads, LRU; hold: every expert resident")
        sp.add_argument("--no-stall", action="store_true",
                        help="never wait for a late high plane: compute with the planes already resident")
        sp.add_argument("--no-prefetch", action="store_true", help="do not predict the next layer's experts")
        sp.add_argument("--loader-threads", type=_positive, default=1, help="I/O threads (default 1)")

    def width_args(sp: argparse.ArgumentParser) -> None:
        from d2moe.routing.tiers import TIERS

        g = sp.add_mutually_exclusive_group()
        g.add_argument("--bits", type=_bits, default=None, help="every expert at this width, 2..8 (default: the "
                                                                  "store's widest)")
        g.add_argument("--tier", choices=TIERS, default=None,
                       help="quality tier: router two picks each expert's width per token (max = 8 bits, min = "
                            "2; high/balanced/fast read ~75/50/30 %% of 8-bit expert bytes; needs `d2moe "
                            "calibrate`, else the nearest fixed width)")
        g.add_argument("--avg-bits", type=float, default=None, help="router two at this mean width (calibrated)")

    run = sub.add_parser("run", help="generate a completion for a prompt")
    model_arg(run)
    run.add_argument("prompt")
    run.add_argument("--max-tokens", type=int, default=32)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--deadline", type=_positive_ms, default=None, metavar="MS",
                     help="per decode step: high planes still loading when a layer's share of it runs out are "
                          "skipped (the expert computes at its resident width; counted in the log)")
    width_args(run)
    engine_args(run)
    threads_arg(run, auto=True)
    run.set_defaults(fn=cmd_run)

    def serving_args(sp: argparse.ArgumentParser, max_batch: bool) -> None:
        sp.add_argument("--context", type=_positive, default=2048,
                        help="tokens per sequence, prompt + answer (default 2048, at most the model's)")
        sp.add_argument("--prefill-chunk", type=_positive, default=128,
                        help="prompt tokens per step and sequence: long prompts cannot starve decoding")
        sp.add_argument("--prefix-cache", type=_non_negative, default=None, metavar="TOKENS",
                        help="KV positions kept for prompt beginnings later requests share (system prompt, earlier "
                             "turns), inside the memory budget (default: the context; 0: off)")
        if max_batch:
            sp.add_argument("--max-batch", type=_positive, default=8, help="requests decoded together (default 8)")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    model_arg(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=_non_negative, default=8000)
    srv.add_argument("--api-key", default=os.environ.get("D2MOE_API_KEY"),
                     help="require `Authorization: Bearer KEY` on every route but /health (default: "
                          "$D2MOE_API_KEY)")
    srv.add_argument("--max-queue", type=_non_negative, default=64,
                     help="requests waiting beyond --max-batch; more get 429")
    srv.add_argument("--request-timeout", type=_seconds, default=600.0, help="seconds per request (default 600)")
    srv.add_argument("--model-name", default=None, help="the model id clients use (default: the store's name)")
    serving_args(srv, max_batch=True)
    engine_args(srv)
    threads_arg(srv, auto=True)
    srv.set_defaults(fn=cmd_serve)

    ch = sub.add_parser("chat", help="interactive chat in the terminal (/reset, /exit, Ctrl-C stops an answer)")
    model_arg(ch)
    width_args(ch)
    ch.add_argument("--max-tokens", type=_positive, default=512, help="per answer (default 512)")
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ch.add_argument("--top-p", type=float, default=1.0)
    ch.add_argument("--system", default=None, help="a system message")
    serving_args(ch, max_batch=False)
    engine_args(ch)
    threads_arg(ch, auto=True)
    ch.set_defaults(fn=cmd_chat)

    ev = sub.add_parser("eval", help="held-out perplexity of a text file")
    model_arg(ev)
    ev.add_argument("--text", required=True)
    width_args(ev)
    ev.add_argument("--max-tokens", type=int, default=8192, help="first N tokens of the file")
    ev.add_argument("--context", type=int, default=512, help="window length (non-overlapping)")
    ev.add_argument("--stepwise", action="store_true",
                    help="score each window one token at a time through the decode path (as generation runs: "
                         "prefetch, --no-stall and --deadline act on every step; slow)")
    ev.add_argument("--deadline", type=_positive_ms, default=None, metavar="MS",
                    help="with --stepwise: the per-step deadline of `run --deadline`")
    engine_args(ev)
    threads_arg(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(fn=cmd_eval)

    cal = sub.add_parser("calibrate", help="measure width costs on text, fit router two, calibrate the tiers")
    model_arg(cal)
    cal.add_argument("--text", nargs="+", required=True, help="calibration text files (never your eval text)")
    cal.add_argument("--tokens", type=_positive, default=4096, help="calibration tokens (default 4096)")
    cal.add_argument("--context", type=_positive, default=256, help="window length (default 256)")
    cal.add_argument("--steps", type=_positive, default=300, help="fitting steps per layer (default 300)")
    cal.add_argument("--finetune-steps", type=_non_negative, default=0,
                     help="end-to-end KL fine-tuning steps of router two, one window each (default 0)")
    cal.add_argument("--quiet", action="store_true", help="no progress bars")
    threads_arg(cal)
    cal.set_defaults(fn=cmd_calibrate)

    info = sub.add_parser("info", help="what a store holds: family, layers, experts, bytes per width, "
                                       "calibration, the smallest memory budget that runs it; given a Hugging "
                                       "Face checkpoint directory or config.json, what `convert` would make of it")
    model_arg(info)
    info.add_argument("--context", type=_positive, default=2048,
                      help="tokens of KV cache the minimum budget reserves (default 2048, as run/serve)")
    info.add_argument("--group-size", type=_positive, default=64,
                      help="MWQ group size for a checkpoint not yet converted (default 64, as convert)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(fn=cmd_info)

    cv = sub.add_parser("convert", help="Hugging Face checkpoint -> bit-nested store")
    cv.add_argument("hf_dir")
    cv.add_argument("out_dir")
    cv.add_argument("--group-size", type=int, default=64)
    cv.add_argument(
        "--mwq", choices=("msb", "residual", "gptq"), default="msb",
        help="how experts are fitted: msb (INT8 read by its top bits), residual (a fitted scale per plane, "
        "more bytes), gptq (msb's layout, bytes and kernels, codes by multi-width GPTQ on --calib-text: "
        "better than msb at 2-5 bits, worse at 8; see the README)",
    )
    cv.add_argument("--calib-text", nargs="+", metavar="FILE",
                    help="calibration text for --mwq gptq (never the text you evaluate on)")
    cv.add_argument("--calib-tokens", type=_positive, default=4096, help="calibration tokens for gptq (default 4096)")
    cv.add_argument(
        "--dense-dtype",
        choices=("auto", "float32", "bfloat16", "float16", "int8"),
        default="int8",
        help="storage dtype of dense matrices (int8: a scale per row and 64 columns as in Q8_0, per row where "
        "the width is not a multiple of 64; half of float16's bytes and the fastest on CPU, perplexity within "
        "noise of float16 on the default model; auto: as in the checkpoint); norms, biases and (with int8) "
        "routers stay float32",
    )
    cv.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    cv.set_defaults(fn=cmd_convert)

    ex = sub.add_parser("export", help="the model at one width as a Hugging Face (safetensors) or llama.cpp (gguf) "
                                       "model, to serve elsewhere")
    ex.add_argument("store")
    ex.add_argument("out", help="a new directory (safetensors) or file (gguf)")
    ex.add_argument("--bits", type=_bits, default=None, help="expert width, 2..8 (default: the store's widest)")
    ex.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors")
    ex.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                    help="safetensors: tensor dtype (auto: the store's dense dtype; bfloat16 for int8 stores)")
    ex.add_argument("--hf-config", default=None, metavar="PATH",
                    help="safetensors: the source's config.json, when the store's source directory is gone and "
                         "its family's config cannot be rebuilt")
    ex.set_defaults(fn=cmd_export)

    sub.add_parser("bench", help="memory-starved benchmark against llama.cpp (root, cgroups; minutes); "
                   "`d2moe bench --help` for its options")

    bd = sub.add_parser("build-default", help="build the built-in default model (MoEfied SmolLM2)")
    bd.add_argument("--force", action="store_true", help="rebuild even if built")
    bd.set_defaults(fn=cmd_build_default)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to benchmarks/bench.py
        return cmd_bench(argv[1:])
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
