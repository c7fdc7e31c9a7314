"""Benchmark models, built into $D2MOE_HOME/bench (never into the repository), each as a Hugging Face checkpoint,
a d2moe store and (when the llama.cpp peer is built) GGUF Q8_0 / Q4_0 files.

- bench8x: a Mixtral built from SmolLM2-135M, 8 experts that are copies of its FFN, random router, top-2 (it
  equals dense SmolLM2 exactly); ~768 MB at Q8_0, ~169 MB of experts per token at INT8.
- split8: a Mixtral whose 8 experts are slices of SmolLM2's FFN neurons, all taken by every token (equals
  dense SmolLM2 exactly); real, distinct expert weights for measuring width routing.
- mixtral2k: a random Mixtral of realistic per-expert shape (hidden 2048, intermediate 5632, 16 heads / 8 kv
  heads of 128, 8 experts, top-2, 4 layers; SmolLM2's tokenizer and vocabulary; bf16, ~2.7 GB): ~35 MB per
  expert and ~277 MB of experts per layer at INT8, ~1.4 GB at Q8_0. Its text is noise (speed only).

    python -m benchmarks.models bench8x|split8|mixtral2k [--force]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.checkpoints import build_random_mixtral, build_smollm2_mixtral
from benchmarks.llamacpp import convert_gguf, find_llamacpp
from d2moe.default_model.paths import d2moe_home


@dataclass(frozen=True)
class BenchModel:
    name: str
    hf: Path
    store: Path
    gguf: dict[str, Path]  # quant type -> file; empty when the peer is absent


def bench_dir() -> Path:
    return d2moe_home() / "bench"


def _build(name: str, make_hf, force: bool, dense_dtype: str, store_name: str, gguf: bool = True,
           keep_f16: bool = True) -> BenchModel:
    """The steps every benchmark model shares, each skipped when its output exists: the HF checkpoint
    (`make_hf(dir)`), a d2moe store with `dense_dtype` dense matrices, and the peer's GGUF files."""
    import torch

    from d2moe.config import MWQConfig
    from d2moe.convert.convert import convert

    root = bench_dir() / name
    if force and root.exists():
        shutil.rmtree(root)
    hf = root / "hf"
    if not (hf / "config.json").is_file():
        print(f"models: building the {name} checkpoint", file=sys.stderr)
        make_hf(hf)
    store = root / store_name
    if not (store / "config.json").is_file():
        print(f"models: converting {name} to a d2moe store ({dense_dtype} dense)", file=sys.stderr)
        dtype = {"int8": torch.int8, "float16": torch.float16}[dense_dtype]
        convert(hf, store, MWQConfig(), dense_dtype=dtype, overwrite=True)
    peer = find_llamacpp() if gguf else None
    files = convert_gguf(peer, hf, root / "gguf", keep_f16=keep_f16) if peer else {}
    return BenchModel(name, hf, store, files)


def build_bench8x(force: bool = False, dense_dtype: str = "int8") -> BenchModel:
    return _build("bench8x", lambda hf: build_smollm2_mixtral(hf, num_experts=8, top_k=2), force, dense_dtype,
                  f"store-{dense_dtype}")


def build_split8(force: bool = False) -> BenchModel:
    return _build("split8", lambda hf: build_smollm2_mixtral(hf, num_experts=8, split=True), force, "float16",
                  "store", gguf=False)


def build_mixtral2k(force: bool = False) -> BenchModel:
    # random weights; the 2.7 GB f16 GGUF is only a step towards the quantized files: not kept
    return _build("mixtral2k", lambda hf: build_random_mixtral(hf, hidden=2048, intermediate=5632, layers=4,
                                                               experts=8, top_k=2, seed=0),
                  force, "int8", "store-int8", keep_f16=False)


BUILDERS = {"bench8x": build_bench8x, "split8": build_split8, "mixtral2k": build_mixtral2k}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(BUILDERS))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    m = BUILDERS[args.name](args.force)
    print(json.dumps({"hf": str(m.hf), "store": str(m.store), "gguf": {k: str(v) for k, v in m.gguf.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
