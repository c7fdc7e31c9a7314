"""Reading a Hugging Face config.json: the fields every family shares, RoPE scaling, and the error type
conversion raises. The families' own config functions (convert/family_configs.py) build on these."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from d2moe.config import ModelConfig, RopeScaling


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message is one line a user can act on."""


@dataclass(frozen=True)
class Part:
    """The piece of a stored tensor that one canonical tensor is, taken in this order: one expert of a
    stacked [E, ...] tensor, MXFP4 or FP8 dequantization (convert/dequant.py), a (start, stop, step) range
    of rows and/or columns (fused or interleaved gate|up projections), a transposition (checkpoints storing
    x @ W)."""

    expert: int | None = None
    rows: tuple[int, int, int] | None = None
    cols: tuple[int, int, int] | None = None
    transposed: bool = False
    mxfp4_scales: str | None = None  # stored as MXFP4 blocks; the name of their E8M0 scales
    fp8_scales: str | None = None  # stored as block FP8; the name of its weight_scale_inv
    fp8_block: tuple[int, int] = (128, 128)


# (model, HF name) -> [(canonical name, part)] for names outside the common table (e.g. fused experts), else None
SpecialNames = Callable[[ModelConfig, str], "list[tuple[str, Part | None]] | None"]
# (HF config, model, canonical name, tensor) -> the tensor as the canonical layout wants it
Fix = Callable[[dict[str, Any], ModelConfig, str, torch.Tensor], torch.Tensor]


def hf_get(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    return default


def rope_params(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers 4 writes `rope_theta` (+ `rope_scaling`); transformers 5 writes `rope_parameters`."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def rope_theta(hf: dict[str, Any]) -> float:
    theta = hf.get("rope_theta", rope_params(hf).get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_scaling(hf: dict[str, Any]) -> RopeScaling | None:
    params = rope_params(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind not in ("yarn", "longrope", "llama3"):
        raise ConversionError(f"rope type {kind!r} is not supported yet (default, yarn, longrope and llama3 are)")
    orig = int(params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096))
    factor = float(params.get("factor") or int(hf["max_position_embeddings"]) / orig)
    if kind == "llama3":
        return RopeScaling(factor=factor, original_max_position=orig, kind="llama3",
                           low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                           high_freq_factor=float(params.get("high_freq_factor", 4.0)))
    if kind == "longrope":  # as transformers computes it: the short factors at every length
        af = params.get("short_mscale") or params.get("attention_factor")
        if af is None:
            af = math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1 else 1.0
        return RopeScaling(factor=factor, original_max_position=orig, attention_factor=float(af), kind="longrope",
                           dim_factors=tuple(float(f) for f in params["short_factor"]))
    af, ms, ms_all = params.get("attention_factor"), params.get("mscale"), params.get("mscale_all_dim")
    if af is None:
        af = yarn_mscale(factor, ms) / yarn_mscale(factor, ms_all) if ms and ms_all else yarn_mscale(factor)
    return RopeScaling(
        factor=factor, original_max_position=orig, beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1), attention_factor=float(af),
        truncate=bool(params.get("truncate", True)),
    )


def eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(int(i) for i in ids if 0 <= int(i) < int(hf["vocab_size"]))


def base_fields(hf: dict[str, Any], family: str) -> dict[str, Any]:
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        bos = hf.get("bos_token_id")
        return dict(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf_get(hf, "num_key_value_heads", default=heads)),
            head_dim=int(hf_get(hf, "head_dim", default=hidden // heads)),
            rope_theta=rope_theta(hf),
            rope_scaling=rope_scaling(hf),
            rms_norm_eps=float(hf_get(hf, "rms_norm_eps", default=1e-6)),
            max_position=int(hf_get(hf, "max_position_embeddings", default=4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=int(bos) if bos is not None and 0 <= int(bos) < int(hf["vocab_size"]) else None,
            eos_token_ids=eos_ids(hf),
        )
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
