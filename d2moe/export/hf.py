"""Export as a Hugging Face checkpoint directory: safetensors shards under the family's own tensor names,
config.json, the tokenizer files and generation_config.json, loadable by transformers, vLLM or SGLang.

Shards follow transformers' convention: one `model.safetensors`, or `model-0000i-of-0000n.safetensors`
plus `model.safetensors.index.json` (total_size and a weight_map) when the model is larger than one shard.
Only one shard is held in memory at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from d2moe.export.atomic import atomic_output
from d2moe.export.hf_config import export_config
from d2moe.export.names import HFTensor, assemble, family_named, hf_tensors, unfixer
from d2moe.export.source import ExportSource
from d2moe.storage.format import TOKENIZER_FILES

SHARD_BYTES = 2 * 1000**3  # as transformers counts "2GB"
INDEX_FILE = "model.safetensors.index.json"


def default_dtype(source: ExportSource) -> torch.dtype:
    """The store's dense dtype; int8 stores export in bfloat16 (the dtype such checkpoints are released in)."""
    d = source.dense_dtype
    return d if d in (torch.float32, torch.float16, torch.bfloat16) else torch.bfloat16


def shard_plan(sizes: list[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    """Tensors in order, a new shard whenever the next one would overflow the current (never empty)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes:
        if shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_hf(source: ExportSource, out: Path, *, dtype: torch.dtype | None = None, hf_config: Path | None = None,
             shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Write the store at its export width as a Hugging Face checkpoint directory `out` (atomically)."""
    model = source.model
    fam = family_named(model.family)
    dtype = dtype or default_dtype(source)
    config = export_config(source.config, fam, dtype, hf_config)
    tensors = hf_tensors(fam, model, source.names(), source.shape)
    unfix = unfixer(fam, config, model)
    itemsize = dtype.itemsize
    by_name: dict[str, HFTensor] = {t.name: t for t in tensors}
    sizes = [(t.name, itemsize * int(torch.Size(t.shape).numel())) for t in tensors]
    plan = shard_plan(sizes, shard_bytes)
    files = shard_names(len(plan))
    with atomic_output(out, directory=True) as tmp:
        bar = tqdm(total=len(tensors), desc=f"exporting {source.bits}-bit safetensors", unit="tensor",
                   disable=not progress, leave=False)
        for fname, names in zip(files, plan):
            data = {n: assemble(by_name[n], source.tensor, unfix, fam.name, dtype) for n in names}
            save_file(data, str(tmp / fname), metadata={"format": "pt"})
            bar.update(len(names))
            del data
        bar.close()
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(n for _, n in sizes)},
                     "weight_map": {n: f for f, names in zip(files, plan) for n in names}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:  # tokenizer files and generation_config.json, as the store kept them
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, tmp / name)
    return Path(out)
