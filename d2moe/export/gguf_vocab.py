"""A store's tokenizer as GGUF metadata: llama.cpp's "gpt2" (byte-level BPE) vocabulary.

llama.cpp re-implements tokenizers: the GGUF carries the token strings (byte-level encoded, as in
tokenizer.json), their types, the merges, and the name of the pre-tokenizer (its regex lives in llama.cpp).
The name is recognised from tokenizer.json's pre_tokenizer for the layouts d2moe's families use (GPT-2,
SmolLM2-style digit splitting, Qwen2, Llama 3); an unknown one falls back to llama.cpp's "default" with a
warning, since text may then split differently there than in transformers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from d2moe.config import ModelConfig
from d2moe.convert.families import ConversionError

log = logging.getLogger(__name__)

_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# pre-tokenizer steps (as _steps spells them) -> llama.cpp's name for the same splitting
_PRE = {
    ("bytelevel+regex",): "gpt-2",
    ("digits", "bytelevel+regex"): "smollm",
    ("split:" + _QWEN2, "bytelevel"): "qwen2",
    ("split:" + _LLAMA3, "bytelevel"): "llama-bpe",
}


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    add_bos: bool
    chat_template: str | None

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        w.add_token_merges(self.merges)
        if self.bos is not None:
            w.add_bos_token_id(self.bos)
        if self.eos is not None:
            w.add_eos_token_id(self.eos)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(False)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _steps(pre: dict[str, Any] | None) -> tuple[str, ...]:
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _steps(p))
    if kind == "ByteLevel":
        return ("bytelevel+regex" if pre.get("use_regex", True) else "bytelevel",)
    if kind == "Digits":
        return ("digits" if pre.get("individual_digits") else "digits-runs",)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return ("split:" + str(pattern.get("Regex", pattern.get("String"))),)
    return (str(kind),)


def _token_id(tok: dict[str, Any], cfg: dict[str, Any], key: str) -> int | None:
    """The id of tokenizer_config's `key` token (a string or {"content": ...}), if the vocabulary has it."""
    value = cfg.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    added = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    return added.get(value, tok["model"]["vocab"].get(value))


def _adds_bos(tok: dict[str, Any], cfg: dict[str, Any]) -> bool:
    if "add_bos_token" in cfg:
        return bool(cfg["add_bos_token"])
    post = tok.get("post_processor") or {}
    single = (post.get("single") or []) if post.get("type") == "TemplateProcessing" else []
    return bool(single) and "SpecialToken" in single[0]


def read_vocab(store: Path, model: ModelConfig) -> Vocab:
    """The store's tokenizer.json (+ tokenizer_config.json) as a llama.cpp vocabulary of `vocab_size`."""
    path = Path(store) / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{path}: missing; a GGUF needs the tokenizer (convert from a checkpoint that has one)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    cfg_path = Path(store) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    bpe = tok.get("model", {})
    byte_level = "bytelevel" in " ".join(_steps(tok.get("pre_tokenizer"))) or (
        (tok.get("decoder") or {}).get("type") == "ByteLevel")
    if bpe.get("type") != "BPE" or not byte_level:
        raise ConversionError(f"{path}: GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2 kind); this "
                              f"one is {bpe.get('type')} without byte-level pre-tokenization (SentencePiece-style)")
    size = model.vocab_size
    tokens: list[str | None] = [None] * size
    types = [gguf.TokenType.UNUSED] * size
    entries = [(i, t, gguf.TokenType.NORMAL) for t, i in bpe["vocab"].items()]
    entries += [(a["id"], a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
                for a in tok.get("added_tokens", [])]
    for i, text, kind in entries:
        if i >= size:
            raise ConversionError(f"{path}: token {text!r} has id {i}, beyond the model's {size} embeddings")
        tokens[i], types[i] = text, kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]
    if not merges:
        log.warning("%s has no BPE merges: llama.cpp refuses a gpt2 vocabulary without them", path)
    steps = _steps(tok.get("pre_tokenizer"))
    pre = _PRE.get(steps)
    if pre is None:
        log.warning("%s: pre-tokenizer %s is not one export recognises; writing llama.cpp's 'default', so "
                    "llama.cpp may split text differently than transformers", path, steps)
        pre = "default"
    eos_ids = model.eos_token_ids
    return Vocab(
        tokens=[t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)],
        types=[int(t) for t in types],
        merges=merges,
        pre=pre,
        bos=_token_id(tok, cfg, "bos_token") if cfg.get("bos_token") else model.bos_token_id,
        eos=_token_id(tok, cfg, "eos_token") if cfg.get("eos_token") else (eos_ids[0] if eos_ids else None),
        add_bos=_adds_bos(tok, cfg),
        chat_template=cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None,
    )
