"""The canonical checkpoint directory the default-model build writes (and the engine's converter reads).

Layout (format "d2moe-canonical", version 1):
  d2moe_checkpoint.json     {"format", "version", "model": ModelConfig.to_dict(), "report": {...}}
  model.safetensors         fp32 tensors with the canonical names of d2moe/models/names.py
  calibration.safetensors   per expert matrix `layers.L.experts.e.{w1,w3,w2}`: mean squared input activation
                            per input column [in] over the calibration tokens routed to that expert (optional)
  tokenizer.json            HF tokenizers JSON
  tokenizer_config.json     bos_token, eos_token, chat_template, ...

The directory is written into a sibling `OUT_DIR.tmp-XXXX` and renamed into place only when complete; an
existing OUT_DIR is moved aside first and deleted after the rename, so OUT_DIR is never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from d2moe.config import ModelConfig

FORMAT = "d2moe-canonical"
VERSION = 1
MANIFEST = "d2moe_checkpoint.json"
MODEL_FILE = "model.safetensors"
CALIBRATION_FILE = "calibration.safetensors"


def _save(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(path))


def write_checkpoint(
    out_dir: Path,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    report: Mapping[str, Any],
    tokenizer_json: str,
    tokenizer_config: Mapping[str, Any],
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint atomically; returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _save(tensors, tmp / MODEL_FILE)
        if calibration is not None:
            _save(calibration, tmp / CALIBRATION_FILE)
        (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(dict(tokenizer_config), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        manifest = {"format": FORMAT, "version": VERSION, "model": config.to_dict(), "report": dict(report)}
        # The manifest goes last: a directory without it is never a checkpoint.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "previous")
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_checkpoint(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, tensors, manifest) of a canonical checkpoint directory."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} checkpoint")
    return ModelConfig.from_dict(manifest["model"]), load_file(str(path / MODEL_FILE)), manifest
