"""What a Hugging Face MoE checkpoint would be as a d2moe store, from its config.json alone (`d2moe info
HF_DIR`): whether d2moe converts it, its shape, its bytes at every width and the smallest memory budget that
runs it, before anyone downloads or converts 50 GB.

Expert bytes are the store layout's own arithmetic (`convert.expert_layout`, the bytes `convert` writes). The
dense part (everything but routed experts) is counted on transformers' model built on the meta device (no
memory, exact for every family transformers builds) minus the routed experts, in the checkpoint's dtype as
`convert` keeps it by default (its routers and norms stay float32: a few MB more), and at per-row int8
(`convert --dense-dtype int8`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from d2moe.config import EngineConfig, ModelConfig, MWQConfig
from d2moe.convert.families import ConversionError, family_for

INT8_ROW_SCALE = 2  # bytes per output row of an int8 matrix (its bfloat16 scale)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def read_hf_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, or the file itself."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    f = path / "config.json" if path.is_dir() else path
    if not f.is_file():
        raise ConversionError(f"{path}: no config.json: neither a d2moe store nor a Hugging Face checkpoint")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{f}: not valid JSON ({e})") from None


def is_store_config(hf: dict[str, Any]) -> bool:
    return hf.get("format") == "d2moe-store"


def routed_expert_params(model: ModelConfig) -> int:
    """Weights of every routed expert: three matrices of hidden x expert intermediate per expert and MoE layer."""
    return len(model.moe_layers) * model.num_experts * 3 * model.hidden_size * model.expert_intermediate


def total_params(hf: dict[str, Any]) -> tuple[int, int]:
    """(all parameters, those of 2-D matrices) of transformers' model for `hf`, built on the meta device."""
    import torch
    import transformers

    text = hf.get("text_config") if "text_config" in hf and "ForConditionalGeneration" in str(hf.get("architectures")) \
        else None
    cfg = transformers.AutoConfig.for_model(**(text or hf))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    every = sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    return every, matrices


def source_dtype(hf: dict[str, Any]) -> str:
    """The checkpoint's weight dtype (transformers 5 writes `dtype`, 4 wrote `torch_dtype`); bfloat16 if unsaid."""
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16")
    return dtype if dtype in DTYPE_BYTES else "bfloat16"


def dense_bytes(params: int, matrix_params: int, rows: int, dtype: str) -> int:
    """Bytes of the dense part: everything in `dtype`, or ("int8") int8 matrices with a scale per row and the
    vectors in 16 bits."""
    if dtype == "int8":
        return matrix_params + rows * INT8_ROW_SCALE + (params - matrix_params) * 2
    return params * DTYPE_BYTES[dtype]


def checkpoint_info(path: Path, context: int = EngineConfig().context, group_size: int = MWQConfig().group_size,
                    hf: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint at `path` (or the config dict `hf`) as the store `d2moe convert` would make, JSON-able."""
    from d2moe.convert.convert import expert_layout
    from d2moe.engine.memory import kv_cache_bytes, plan_memory

    hf = read_hf_config(path) if hf is None else hf
    fam = family_for(hf)
    model = fam.config_fn(hf, fam.name)
    mwq = MWQConfig(group_size=group_size)
    layout = expert_layout(model, mwq)
    every, matrices = total_params(hf)
    experts = routed_expert_params(model)
    dense_params = every - experts
    dense_matrix_params = matrices - experts
    rows = dense_matrix_params // model.hidden_size  # an estimate of output rows for the int8 scales
    dense = {d: dense_bytes(dense_params, dense_matrix_params, rows, d) for d in (source_dtype(hf), "int8")}
    n_experts = len(model.moe_layers) * model.num_experts
    expert_bytes = {str(b): n_experts * layout.prefix_bytes(b) for b in mwq.widths}
    minimum = {d: plan_memory(model, EngineConfig(context=context), n, layout, expert_bytes['8']).minimum
               for d, n in dense.items()}
    return {
        "checkpoint": str(path),
        "family": fam.name,
        "parameters": every,
        "routed_expert_parameters": experts,
        "active_parameters": dense_params + experts * model.top_k // model.num_experts,
        "layers": model.num_layers,
        "moe_layers": len(model.moe_layers),
        "experts": model.num_experts,
        "top_k": model.top_k,
        "expert_intermediate": model.expert_intermediate,
        "group_size": group_size,
        "expert_bytes": expert_bytes,
        "bytes_per_expert": {str(b): layout.prefix_bytes(b) for b in mwq.widths},
        "dense_bytes": dense,
        "kv_cache_bytes_per_token": kv_cache_bytes(model, 1),
        "context": context,
        "min_memory_budget": minimum,
    }


def format_checkpoint_info(info: dict[str, Any]) -> str:
    """`checkpoint_info` for people: one topic a line."""
    from d2moe.util.sizes import format_size

    b = lambda n: f"{n / 1e9:.2f} B"  # noqa: E731
    widths = "\n".join(f"{'':<15}{w} bits: {format_size(n):>11} in all, {format_size(info['bytes_per_expert'][w]):>11} "
                       "per expert" for w, n in info["expert_bytes"].items())
    rows = [
        ("checkpoint", f"{info['checkpoint']} (not converted: sizes `d2moe convert` would give)"),
        ("family", info["family"]),
        ("parameters", f"{b(info['parameters'])} ({b(info['routed_expert_parameters'])} in routed experts, "
                       f"{b(info['active_parameters'])} active per token)"),
        ("layers", f"{info['layers']} ({info['moe_layers']} MoE)"),
        ("experts", f"{info['experts']} per MoE layer, top-{info['top_k']}, "
                    f"intermediate {info['expert_intermediate']}"),
        ("expert bytes", f"by width (MWQ groups of {info['group_size']})\n" + widths),
        ("dense bytes", ", ".join(f"{format_size(n)} {d}" for d, n in info["dense_bytes"].items())
         + " (convert --dense-dtype int8)"),
        ("KV cache", f"{format_size(info['kv_cache_bytes_per_token'])} per token"),
        ("min budget", ", ".join(f"{format_size(n)} with {d} dense" for d, n in info["min_memory_budget"].items())
         + f" at context {info['context']}"),
    ]
    return "\n".join(f"{k + ':':<15}{v}" for k, v in rows)
