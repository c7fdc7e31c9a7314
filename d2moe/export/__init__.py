"""`d2moe export`: the model at one width, for when a user outgrows one device.

A store holds every width at once (the b-bit expert is a prefix of its blob). Export picks one width,
dequantizes every expert at it and writes a model other engines serve:

* safetensors (export/hf.py): a Hugging Face checkpoint under the family's own names and layout, for
  transformers, vLLM and SGLang (expert parallelism across devices);
* gguf (export/gguf_file.py): a llama.cpp model (Mixtral as arch "llama", Qwen2-MoE, Qwen3-MoE, OLMoE), experts in
  the llama.cpp type that holds the width's values (exactly where one does), for llama.cpp and its RPC.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

FORMATS = ("safetensors", "gguf")


def export(store: Path, out: Path, *, bits: int | None = None, fmt: str = "safetensors",
           dtype: torch.dtype | None = None, hf_config: Path | None = None, progress: bool = True) -> Path:
    """Export `store` at `bits` (default: its widest) to `out` in `fmt`; returns `out`. Errors are one-line
    StoreError / ConversionError / FileExistsError messages."""
    from d2moe.errors import MissingDependency
    from d2moe.export.source import ExportSource
    from d2moe.storage.reader import StoreReader

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (choose one of {', '.join(FORMATS)})")
    if fmt == "gguf":
        if dtype is not None or hf_config is not None:
            raise ValueError("--dtype and --hf-config are for safetensors; a gguf keeps the store's dense dtype")
        if importlib.util.find_spec("gguf") is None:
            raise MissingDependency("gguf export needs the gguf package: pip install 'd2moe[convert]'")
    if bits is None:
        reader = StoreReader(Path(store))
        bits = reader.max_bits
        reader.close()
    with ExportSource(Path(store), bits) as source:
        if fmt == "safetensors":
            from d2moe.export.hf import write_hf

            return write_hf(source, Path(out), dtype=dtype, hf_config=hf_config, progress=progress)
        from d2moe.export.gguf_file import write_gguf

        return write_gguf(source, Path(out), progress=progress)
