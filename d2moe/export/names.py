"""Canonical tensors -> a family's Hugging Face tensors: the converter's name table run backwards.

The converter maps each HF tensor name to the canonical tensors it holds (`convert.families.tensor_parts`),
with the part of a stacked, fused or transposed tensor each one is. Export lists the names a family's
checkpoints use, asks that same table what each holds and puts the parts back together, so the two
directions cannot disagree about a layout (Mixtral's per-expert w1/w3/w2, GPT-OSS's interleaved
gate|up stored as x @ W, Granite's fused input_linear, ...). The families' conversion rewrites (RoPE rows
reordered for DeepSeek, ERNIE, Llama 4) are undone by running them on row indices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from d2moe.config import ModelConfig
from d2moe.convert.families import FAMILIES, ConversionError, Family, Part, tensor_parts

# HF module names that differ between families (the converter accepts several; export writes the one
# the family's own checkpoints use)
_ROUTER = {"llama4": "router", "gpt_oss": "router", "granitemoe": "router.layer", "granitemoeshared": "router.layer",
           "hunyuan_v1_moe": "gate.wg", "granitemoe_swa": "router"}
_SHARED = {"qwen2_moe": "shared_expert", "llama4": "shared_expert", "hunyuan_v1_moe": "shared_mlp"}
_SAVES_STACKED = {"granitemoe_swa"}  # experts saved as experts.gate_up_proj / down_proj, not input/output_linear
_QK_NORMS = {"hunyuan_v1_moe": ("query_layernorm", "key_layernorm")}
_CHOICE_BIAS = {"ernie4_5_moe": "mlp.moe_statics.e_score_correction_bias",
                "minimax_m2": "block_sparse_moe.e_score_correction_bias", "exaone_moe": "mlp.e_score_correction_bias"}
_HF_SHAPE = {("ernie4_5_moe", "mlp.moe_statics.e_score_correction_bias"): (1, -1)}  # stored [1, E]
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
         "kv_b_proj", "q_a_layernorm", "kv_a_layernorm")
_FFN = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class HFTensor:
    """One tensor of the exported checkpoint: its name, shape and the canonical tensors it is made of."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[tuple[str, Part | None], ...]


def family_named(name: str) -> Family:
    """The converter's family row for a store's `model.family`."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    known = ", ".join(f.name for f in FAMILIES)
    if name == "moefied_llama":
        raise ConversionError(
            "this store is the built-in MoEfied SmolLM2 (linear router scores, absent-expert vectors): no Hugging "
            f"Face or llama.cpp architecture computes it, so it cannot be exported; export handles: {known}")
    raise ConversionError(f"cannot export family {name!r}; export handles: {known}")


def _candidates(fam: Family, model: ModelConfig) -> Iterator[str]:
    """Every HF tensor name the family's checkpoints may hold for this model, preferred spellings first."""
    yield from ("model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight", "lm_head.bias")
    mod = fam.moe_module
    dense_mod = "feed_forward" if mod == "feed_forward" else "mlp"
    router = _ROUTER.get(fam.name, "gate")
    shared = _SHARED.get(fam.name, "shared_experts")
    for L in range(model.num_layers):
        p = f"model.layers.{L}."
        for norm in ("input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"):
            yield from (f"{p}{norm}.weight", f"{p}{norm}.bias")
        for proj in _QK_NORMS.get(fam.name, ()) + _ATTN:
            yield from (f"{p}self_attn.{proj}.weight", f"{p}self_attn.{proj}.bias")
        yield f"{p}self_attn.sinks"
        if L in model.dense_layers:
            yield from (f"{p}{dense_mod}.{proj}.weight" for proj in _FFN)
            continue
        yield from (f"{p}{mod}.{router}.weight", f"{p}{mod}.{router}.bias")
        yield p + _CHOICE_BIAS.get(fam.name, f"{mod}.gate.e_score_correction_bias")
        for e in range(model.num_experts):
            yield from (f"{p}{mod}.experts.{e}.{proj}.weight" for proj in fam.expert_matrices.values())
        # stacked / fused layouts (Granite's saved names before transformers 5's in-memory ones, which
        # GraniteMoeSWA saves)
        fused = (f"{p}{mod}.input_linear.weight", f"{p}{mod}.output_linear.weight")
        stacked = tuple(f"{p}{mod}.experts.{n}" for n in ("gate_up_proj", "gate_up_proj_bias", "down_proj",
                                                            "down_proj_bias"))
        yield from stacked + fused if fam.name in _SAVES_STACKED else fused + stacked
        yield from (f"{p}shared_mlp.input_linear.weight", f"{p}shared_mlp.output_linear.weight")
        yield from (f"{p}{dense_mod}.{shared}.{proj}.weight" for proj in _FFN)
        yield f"{p}mlp.shared_expert_gate.weight"


def _shape(parts: list[tuple[str, Part | None]], shapes: Callable[[str], tuple[int, ...]]) -> tuple[int, ...]:
    """The HF tensor's shape from its parts: rows/cols ranges end at the full extent; experts stack first."""
    dims: list[int] = []
    experts = 0
    for canon, part in parts:
        s = list(shapes(canon))
        if part is None:
            return tuple(s)
        if part.transposed:
            s = s[::-1]
        if part.rows is not None:
            s[0] = part.rows[1]
        if part.cols is not None:
            s[1] = part.cols[1]
        dims = s if not dims else [max(a, b) for a, b in zip(dims, s)]
        if part.expert is not None:
            experts = max(experts, part.expert + 1)
    return (experts, *dims) if experts else tuple(dims)


def hf_tensors(fam: Family, model: ModelConfig, names: list[str],
               shapes: Callable[[str], tuple[int, ...]]) -> list[HFTensor]:
    """The tensors of the family's HF checkpoint holding exactly the canonical tensors `names`; raises
    ConversionError when one of them has no place in the family's layout."""
    have, claimed = set(names), set()
    out: list[HFTensor] = []
    for name in _candidates(fam, model):
        parts = tensor_parts(fam, model, name)
        if not parts or any(c not in have or c in claimed for c, _ in parts):
            continue
        if any(p is not None and (p.mxfp4_scales or p.fp8_scales) for _, p in parts):
            continue  # quantized spellings: export writes floats
        claimed.update(c for c, _ in parts)
        out.append(HFTensor(name, _shape(parts, shapes), tuple(parts)))
    missing = [n for n in names if n not in claimed]
    if missing:
        raise ConversionError(f"no {fam.name} checkpoint tensor holds {len(missing)} of this store's tensors, "
                              f"e.g. {', '.join(missing[:3])}")
    return out


def assemble(t: HFTensor, get: Callable[[str], torch.Tensor], unfix: Callable[[str, torch.Tensor], torch.Tensor],
             family: str, dtype: torch.dtype) -> torch.Tensor:
    """The HF tensor in `dtype`: each part (undone rewrites, transposed back) copied to where it came from."""
    if len(t.parts) == 1 and t.parts[0][1] is None:
        out = unfix(t.parts[0][0], get(t.parts[0][0])).to(dtype).contiguous()
    else:
        out = torch.empty(t.shape, dtype=dtype)
        filled = 0
        for canon, part in t.parts:
            c = unfix(canon, get(canon))
            view = out if part.expert is None else out[part.expert]
            if part.rows is not None:
                view = view[slice(*part.rows)]
            if part.cols is not None:
                view = view[:, slice(*part.cols)]
            view.copy_(c.T if part.transposed else c)
            filled += c.numel()
        if filled != out.numel():
            raise ConversionError(f"{t.name}: its parts cover {filled} of {out.numel()} values")
    shape = _HF_SHAPE.get((family, t.name.split(".", 3)[-1]))
    return out.reshape(shape) if shape is not None else out


def unfixer(fam: Family, hf: dict[str, Any], model: ModelConfig) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The inverse of the family's conversion rewrite. The rewrites reorder rows (RoPE layouts), so running
    one on row numbers shows where each row went; any other kind of rewrite is refused."""
    if fam.fix is None:
        return lambda name, t: t

    def unfix(name: str, t: torch.Tensor) -> torch.Tensor:
        probe = torch.arange(t.shape[0], dtype=torch.float64).reshape(-1, *([1] * (t.dim() - 1)))
        moved = fam.fix(hf, model, name, probe).reshape(-1)
        if moved.numel() != t.shape[0] or not torch.equal(moved.sort().values, probe.reshape(-1)):
            raise ConversionError(f"cannot undo {fam.name}'s conversion rewrite of {name}")
        perm = moved.long()
        if torch.equal(perm, torch.arange(t.shape[0])):
            return t
        out = torch.empty_like(t)
        out[perm] = t
        return out

    return unfix
