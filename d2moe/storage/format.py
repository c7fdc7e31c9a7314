"""The d2moe store: one versioned description of the on-disk layout.

A store is a directory:
  config.json         {"format": "d2moe-store", "format_version": 1, "model": ModelConfig, "mwq": MWQConfig, ...}
  dense.safetensors   everything that is not a routed expert (always resident); matrices in float, or (convert
                      --dense-dtype int8) per-row int8: `name` int8 [out, in] + `name.scale` bfloat16 [out],
                      W = q * scale[:, None] (models/dense.py); vectors, routers and gates stay float32
  experts.bin         one blob per (layer, expert), each starting on a 4 KiB boundary; inside a blob, slices are
                      ordered by significance (see quant/pack.py), so the b-bit expert is the prefix that ends
                      with slice b, and (since version 2) every slice starts and ends on a 4 KiB boundary: a
                      slice is one O_DIRECT read and one unit of the expert cache
  index.json          per blob: layer, expert, offset, prefix length per width, CRC32 per slice
  tokenizer files     tokenizer.json, tokenizer_config.json (when the source had them)
  calibration.json    optional: per-expert popularity and sensitivity
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from d2moe.config import ModelConfig, MWQConfig
from d2moe.quant.pack import ExpertLayout

FORMAT_NAME = "d2moe-store"
FORMAT_VERSION = 2  # 2: slices 4 KiB aligned inside blobs
BLOB_ALIGNMENT = 4096
CONFIG_FILE = "config.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.bin"
INDEX_FILE = "index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class StoreError(RuntimeError):
    """A store is missing, from a newer version, or damaged; the message names the file (and expert)."""


def align_up(n: int, alignment: int = BLOB_ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class BlobEntry:
    """Where one expert lives in experts.bin and how to verify each of its slices."""

    layer: int
    expert: int
    offset: int
    prefix_bytes: tuple[int, ...]  # index w - min_bits: bytes of slices min_bits..w
    checksums: tuple[int, ...]  # CRC32 of each slice, same indexing

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "expert": self.expert,
            "offset": self.offset,
            "prefix_bytes": list(self.prefix_bytes),
            "crc32": list(self.checksums),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlobEntry:
        return cls(d["layer"], d["expert"], d["offset"], tuple(d["prefix_bytes"]), tuple(d["crc32"]))


@dataclass(frozen=True)
class StoreConfig:
    """Contents of a store's config.json."""

    model: ModelConfig
    mwq: MWQConfig
    expert_shapes: tuple[tuple[str, int, int], ...]
    source: str = ""

    @property
    def layout(self) -> ExpertLayout:
        """Byte layout of every expert blob of this store."""
        return ExpertLayout(self.expert_shapes, self.mwq, slice_align=BLOB_ALIGNMENT)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": self.model.to_dict(),
            "mwq": {
                "group_size": self.mwq.group_size,
                "method": self.mwq.method,
                "min_bits": self.mwq.min_bits,
                "max_bits": self.mwq.max_bits,
            },
            "expert_shapes": [list(s) for s in self.expert_shapes],
            "blob_alignment": BLOB_ALIGNMENT,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path) -> StoreConfig:
        if d.get("format") != FORMAT_NAME:
            raise StoreError(f"{path}: not a d2moe store (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format version {d.get('format_version')} is not supported "
                f"(this d2moe reads version {FORMAT_VERSION}); re-run `d2moe convert`"
            )
        try:
            return cls(
                model=ModelConfig.from_dict(d["model"]),
                mwq=MWQConfig(**d["mwq"]),
                expert_shapes=tuple((str(n), int(o), int(i)) for n, o, i in d["expert_shapes"]),
                source=d.get("source", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{path}: malformed store config ({e})") from e


def load_store_config(store_dir: Path) -> StoreConfig:
    path = Path(store_dir) / CONFIG_FILE
    if not Path(store_dir).is_dir():
        raise StoreError(f"{store_dir}: no such model directory")
    if not path.is_file():
        raise StoreError(f"{path}: missing; is {store_dir} a d2moe store (made by `d2moe convert`)?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: not valid JSON ({e})") from e
    return StoreConfig.from_dict(data, path)
