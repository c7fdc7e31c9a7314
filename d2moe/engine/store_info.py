"""What a store holds and the smallest memory budget that runs it, read without loading any weights
(`d2moe info`): the config, the index, the dense file's safetensors header and whether it is calibrated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import safe_open

from d2moe.config import EngineConfig, ModelConfig
from d2moe.engine.memory import kv_cache_bytes, plan_memory
from d2moe.routing.calibration import load_calibration
from d2moe.storage.format import DENSE_FILE, StoreError
from d2moe.storage.reader import StoreReader
from d2moe.util.sizes import format_size


def stored_dense_bytes(path: Path) -> int:
    """Bytes of dense.safetensors' tensors from its header: what loading them holds (models/dense.py loads
    every tensor as stored; the fused q|k|v are views)."""
    import torch

    f_path = path / DENSE_FILE
    if not f_path.is_file():
        raise StoreError(f"{f_path}: missing; the store is incomplete")
    total = 0
    with safe_open(str(f_path), "pt") as f:
        for name in f.keys():
            s = f.get_slice(name)
            n = 1
            for d in s.get_shape():
                n *= d
            dtype = getattr(torch, _SAFETENSORS_DTYPES[s.get_dtype()])
            total += n * dtype.itemsize
    return total


_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8",
                       "I32": "int32", "I64": "int64", "F64": "float64", "BOOL": "bool", "I16": "int16"}


def _routing(cfg: ModelConfig) -> dict[str, Any]:
    r: dict[str, Any] = {"scoring": cfg.router_scoring, "normalized": cfg.norm_topk_prob}
    if cfg.expert_groups > 1:
        r["groups"] = {"count": cfg.expert_groups, "chosen": cfg.topk_groups, "score": cfg.group_score}
    if cfg.router_bias:
        r["choice_bias"] = True
    if cfg.routed_scaling_factor != 1.0:
        r["scaling_factor"] = cfg.routed_scaling_factor
    if cfg.expert_input_weighted:
        r["weights_scale_input"] = True
    return r


def _attention(cfg: ModelConfig) -> dict[str, Any]:
    a: dict[str, Any] = {"kind": cfg.attention, "heads": cfg.num_heads, "head_dim": cfg.head_dim}
    if cfg.attention == "mla":
        a.update(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim,
                 v_head_dim=cfg.value_dim)
    else:
        a["kv_heads"] = cfg.num_kv_heads
    if cfg.rope_scaling is not None:
        a["rope_scaling"] = {"kind": cfg.rope_scaling.kind, "factor": cfg.rope_scaling.factor}
    if cfg.attention_sinks:
        a["sinks"] = True
    if cfg.sliding_layers:
        a["sliding"] = {"window": cfg.sliding_window, "layers": len(cfg.sliding_layers)}
    if cfg.chunked_layers:
        a["chunked"] = {"chunk": cfg.attention_chunk, "layers": len(cfg.chunked_layers)}
    if cfg.nope_layers:
        a["nope_layers"] = len(cfg.nope_layers)
    return a


def store_info(path: Path, context: int = EngineConfig().context) -> dict[str, Any]:
    """The store at `path` as a JSON-able dict (see `format_info` for the human form)."""
    path = Path(path)
    reader = StoreReader(path)
    try:
        cfg, layout, widths = reader.config.model, reader.config.layout, reader.config.mwq.widths
        calibration = load_calibration(path, cfg)
        guess = calibration.next_guess if calibration is not None else {}
        dense = stored_dense_bytes(path) + sum(t.nbytes for t in guess.values())  # as open_model holds them
        all_experts = len(cfg.moe_layers) * cfg.num_experts * layout.prefix_bytes(reader.max_bits)
        plan = plan_memory(cfg, EngineConfig(context=context), dense, layout, all_experts)
        info: dict[str, Any] = {
            "model": str(path),
            "family": cfg.family,
            "layers": cfg.num_layers,
            "moe_layers": len(cfg.moe_layers),
            "dense_layers": list(cfg.dense_layers),
            "hidden_size": cfg.hidden_size,
            "experts": cfg.num_experts,
            "top_k": cfg.top_k,
            "expert_intermediate": cfg.expert_intermediate,
            "expert_activation": cfg.expert_act + (" with biases" if cfg.expert_bias else ""),
            "shared_experts": {"intermediate": cfg.shared_expert_intermediate, "gated": cfg.shared_expert_gate}
            if cfg.shared_expert_intermediate else None,
            "routing": _routing(cfg),
            "attention": _attention(cfg),
            "mwq": {"method": reader.config.mwq.method, "group_size": reader.config.mwq.group_size},
            "expert_bytes": {str(b): reader.total_expert_bytes(b) for b in widths},
            "bytes_per_expert": {str(b): layout.prefix_bytes(b) for b in widths},
            "slice_bytes": {str(b): layout.slice_bytes(b) for b in widths},
            "dense_bytes": dense,
            "experts_file_bytes": reader.file_bytes(),
            "kv_cache_bytes_per_token": kv_cache_bytes(cfg, 1),
            "calibrated": calibration is not None,
            "next_guess": "fitted" if guess else "router",
            "context": context,
            "min_memory_budget": plan.minimum,
            "min_memory_budget_parts": {"dense": plan.dense, "kv_cache": plan.kv_cache, "scratch": plan.scratch,
                                        "experts": plan.minimum - plan.dense - plan.kv_cache - plan.scratch},
        }
        if calibration is not None:
            info["tiers"] = sorted(calibration.tiers)
        return info
    finally:
        reader.close()


def format_info(info: dict[str, Any]) -> str:
    """`store_info` for people: one topic a line."""
    dense_layers = info["dense_layers"]
    layers = f"{info['layers']} ({info['moe_layers']} MoE"
    layers += f", {len(dense_layers)} dense: {', '.join(map(str, dense_layers))})" if dense_layers else ")"
    r = info["routing"]
    route = r["scoring"] + (f", best {r['groups']['chosen']} of {r['groups']['count']} groups" if "groups" in r else "")
    route += ", choice bias" if r.get("choice_bias") else ""
    route += f", x{r['scaling_factor']:g}" if "scaling_factor" in r else ""
    route += ", weights scale the expert input" if r.get("weights_scale_input") else ""
    shared = info["shared_experts"]
    shared_text = "none" if shared is None else (
        f"intermediate {shared['intermediate']}" + (" (sigmoid-gated)" if shared["gated"] else "") + ", resident")
    a = info["attention"]
    attn = f"{a['kind']}, {a['heads']} heads x {a['head_dim']}"
    attn += (f", kv latent {a['kv_lora_rank']} + rope {a['rope_dim']}, v {a['v_head_dim']}" if a["kind"] == "mla"
             else f", {a['kv_heads']} kv heads")
    attn += f", {a['rope_scaling']['kind']} x{a['rope_scaling']['factor']:g}" if "rope_scaling" in a else ""
    attn += ", sinks" if a.get("sinks") else ""
    attn += f", window {a['sliding']['window']} on {a['sliding']['layers']} layers" if "sliding" in a else ""
    attn += f", chunks of {a['chunked']['chunk']} on {a['chunked']['layers']} layers" if "chunked" in a else ""
    attn += f", {a['nope_layers']} layers without RoPE" if "nope_layers" in a else ""
    widths = "\n".join(f"{'':<15}{b} bits: {format_size(n):>11} in all, {format_size(info['bytes_per_expert'][b]):>11} "
                       "per expert" for b, n in info["expert_bytes"].items())
    parts = info["min_memory_budget_parts"]
    minimum = (f"{format_size(info['min_memory_budget'])} at context {info['context']} (dense "
               f"{format_size(parts['dense'])} + KV cache {format_size(parts['kv_cache'])} + scratch "
               f"{format_size(parts['scratch'])} + {info['top_k']} experts at 2 bits {format_size(parts['experts'])})")
    calibration = ("yes, tiers " + ", ".join(info.get("tiers", [])) if info["calibrated"]
                   else "no (fixed widths; `d2moe calibrate` fits the width router)")
    if info["calibrated"]:
        calibration += ("; next-layer guess fitted" if info["next_guess"] == "fitted"
                        else "; next-layer guess by the router (calibrated before the fitted guess)")
    rows = [
        ("model", info["model"]),
        ("family", info["family"]),
        ("layers", layers),
        ("experts", f"{info['experts']} routed per MoE layer, top-{info['top_k']}, intermediate "
                    f"{info['expert_intermediate']} ({info['expert_activation']}); routing {route}"),
        ("shared expert", shared_text),
        ("attention", attn),
        ("quantization", f"MWQ {info['mwq']['method']}, groups of {info['mwq']['group_size']}"),
        ("expert bytes", "by width\n" + widths),
        ("dense bytes", format_size(info["dense_bytes"])),
        ("KV cache", f"{format_size(info['kv_cache_bytes_per_token'])} per token"),
        ("calibrated", calibration),
        ("min budget", minimum),
    ]
    return "\n".join(f"{k + ':':<15}{v}" for k, v in rows)
