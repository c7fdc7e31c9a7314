"""The llama.cpp peer for benchmarks: built once from the `llama-cpp-python==0.3.36` source package into
$D2MOE_HOME/peers (never into the repository), converted GGUF models, and timed runs.

    python -m benchmarks.llamacpp build                 # ~6-8 minutes on 2 cores, once
    python -m benchmarks.llamacpp gguf HF_DIR OUT_DIR   # f16 -> Q8_0 and Q4_0 next to it

Benchmarks call `find_llamacpp()` and skip the peer, with a note, when it is absent.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from d2moe.default_model.paths import d2moe_home

VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-completion", "llama-quantize")
SERVER = "llama-server"  # built on demand (`build-server`): only benchmarks/serve_peer.py needs it


def peers_dir() -> Path:
    return d2moe_home() / "peers"


def source_dir() -> Path:
    return peers_dir() / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"


@dataclass(frozen=True)
class LlamaCpp:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "build" / "bin"

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    def tool(self, name: str) -> str:
        return str(self.bin / name)


def find_llamacpp() -> LlamaCpp | None:
    peer = LlamaCpp(source_dir())
    return peer if all((peer.bin / t).is_file() for t in TARGETS) else None


def build() -> LlamaCpp:
    """Download the sdist (PyPI), untar, build the few tools benchmarks use. Idempotent."""
    found = find_llamacpp()
    if found:
        return found
    peers_dir().mkdir(parents=True, exist_ok=True)
    sdist = peers_dir() / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        print("llamacpp: downloading the llama-cpp-python source package", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(peers_dir()), f"llama-cpp-python=={VERSION}"], check=True)
    if not source_dir().is_dir():
        with tarfile.open(sdist) as tar:
            tar.extractall(peers_dir(), filter="data")
    src = source_dir()
    print(f"llamacpp: building {', '.join(TARGETS)} in {src}/build (minutes)", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_OPENSSL=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(src / "build"), "-j2", "--target", *TARGETS], check=True,
                   stdout=subprocess.DEVNULL)
    found = find_llamacpp()
    if found is None:
        raise RuntimeError("llama.cpp build finished but its binaries are missing")
    return found


def convert_gguf(peer: LlamaCpp, hf_dir: Path, out_dir: Path, quants: tuple[str, ...] = ("Q8_0", "Q4_0"),
                 keep_f16: bool = True) -> dict:
    """HF checkpoint -> f16 GGUF -> quantized GGUFs (skipped when present); returns {type: path}. With
    `keep_f16=False` the f16 file is deleted once every quantized file exists (and not listed). Each file is
    written under a temporary name and renamed, so an interrupted build is not taken for a finished one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "model-f16.gguf"
    paths = {q: out_dir / f"model-{q}.gguf" for q in quants}
    if not f16.is_file() and (keep_f16 or not all(p.is_file() for p in paths.values())):
        part = f16.with_suffix(".part")
        subprocess.run([sys.executable, str(peer.converter), str(hf_dir), "--outfile", str(part), "--outtype", "f16"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        part.rename(f16)
    for q, path in paths.items():
        if not path.is_file():
            part = path.with_suffix(".part")
            subprocess.run([peer.tool("llama-quantize"), str(f16), str(part), q], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            part.rename(path)
    if keep_f16:
        return {"F16": f16, **paths}
    f16.unlink(missing_ok=True)
    return paths


_TIMING = re.compile(r"(prompt eval|eval) time\s*=\s*([\d.]+) ms /\s*(\d+) (?:tokens|runs)")


def parse_timings(stderr: str) -> dict:
    """Prefill and decode tokens/s from llama.cpp's `llama_perf_context_print` lines."""
    out = {}
    for kind, ms, n in _TIMING.findall(stderr):
        key = "prefill_tokens_per_s" if kind == "prompt eval" else "decode_tokens_per_s"
        out[key] = int(n) / (float(ms) / 1000) if float(ms) > 0 else 0.0
        out[key.replace("_tokens_per_s", "_tokens")] = int(n)
    return out


def build_server() -> Path:
    """Build llama-server into the peer's build directory (after `build`); returns its path."""
    peer = build()
    path = peer.bin / SERVER
    if not path.is_file():
        print(f"llamacpp: building {SERVER} (minutes)", file=sys.stderr)
        subprocess.run(["cmake", "--build", str(peer.root / "build"), "-j2", "--target", SERVER], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def completion_command(peer: LlamaCpp, gguf: Path, prompt: str, tokens: int, threads: int = 2) -> list[str]:
    """A greedy completion that reports its timings (llama-completion, no conversation mode)."""
    return [peer.tool("llama-completion"), "-m", str(gguf), "-p", prompt, "-n", str(tokens), "-t", str(threads),
            "--temp", "0", "-no-cnv", "--no-warmup", "-c", "512", "--seed", "0"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build and use the llama.cpp peer (benchmarks only)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build")
    sub.add_parser("build-server")
    g = sub.add_parser("gguf")
    g.add_argument("hf_dir")
    g.add_argument("out_dir")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        print(build().root)
    elif args.cmd == "build-server":
        print(build_server())
    else:
        peer = find_llamacpp()
        if peer is None:
            print("llama.cpp is not built: python -m benchmarks.llamacpp build", file=sys.stderr)
            return 2
        print(json.dumps({k: str(v) for k, v in convert_gguf(peer, Path(args.hf_dir), Path(args.out_dir)).items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
