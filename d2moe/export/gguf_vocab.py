"""A store's tokenizer as GGUF metadata: llama.cpp's "gpt2" (byte-level BPE) or "llama" (SentencePiece
BPE with byte fallback, as Mixtral and Llama 2 ship it) vocabulary.

llama.cpp re-implements tokenizers. For "gpt2" the GGUF carries the token strings (byte-level encoded, as in
tokenizer.json), their types, the merges, and the name of the pre-tokenizer (its regex lives in llama.cpp).
The name is recognised from tokenizer.json's pre_tokenizer for the layouts d2moe's families use (GPT-2,
SmolLM2-style digit splitting, Qwen2, Llama 3); an unknown one falls back to llama.cpp's "default" with a
warning, since text may then split differently there than in transformers.

For "llama" it carries the pieces (spaces as U+2581), a score per piece and their types; llama.cpp merges
adjacent symbols whose concatenation is a piece, best score first. tokenizer.json keeps no scores, only the
merges that SentencePiece's scores ordered, so a merged piece scores minus the rank of its first merge
(`spm_scores`): the same order, hence the same tokens (tested against transformers through llama.cpp).
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


SPACE = "\u2581"  # SentencePiece's space


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
    kind: str = "gpt2"  # llama.cpp's tokenizer model: "gpt2" or "llama" (SentencePiece)
    scores: list[float] | None = None  # "llama" only
    unk: int | None = None
    add_space_prefix: bool = True  # "llama" only: SentencePiece's dummy prefix

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.kind)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.kind == "llama":
            w.add_tokenizer_pre("default")
            w.add_token_scores(self.scores or [0.0] * len(self.tokens))
            w.add_add_space_prefix(self.add_space_prefix)
            if self.unk is not None:
                w.add_unk_token_id(self.unk)
        else:
            w.add_tokenizer_pre(self.pre)
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


def _merge_pairs(bpe: dict[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in bpe.get("merges", [])]


def _sentencepiece_layout(tok: dict[str, Any]) -> bool | None:
    """Whether tokenizer.json is a converted SentencePiece BPE (byte fallback, spaces as U+2581): None if not,
    else whether it adds SentencePiece's dummy space prefix (a Prepend normalizer, or a Metaspace
    pre-tokenizer that prepends)."""
    bpe = tok.get("model", {})
    if bpe.get("type") != "BPE" or not bpe.get("byte_fallback"):
        return None
    if SPACE not in json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer"), tok.get("decoder")],
                               ensure_ascii=False):
        return None
    norm = json.dumps(tok.get("normalizer"))
    pre = tok.get("pre_tokenizer") or {}
    metaspace = [p for p in ([pre] + pre.get("pretokenizers", [])) if p.get("type") == "Metaspace"]
    if metaspace:
        return metaspace[0].get("prepend_scheme", "always") != "never"
    return '"Prepend"' in norm


def spm_scores(vocab: dict[str, int], merges: list[str]) -> dict[str, float]:
    """A SentencePiece score per piece from BPE merges: minus the rank of the piece's first merge, so a
    best-score-first merge of adjacent symbols (llama.cpp) applies them in the merges' order; pieces no merge
    makes (characters, bytes, specials) score below every merge, as SentencePiece's single characters do."""
    scores: dict[str, float] = {}
    for rank, m in enumerate(merges):
        scores.setdefault(m.replace(" ", "", 1), -float(rank))  # "a b" makes "ab" (pieces hold no ASCII space)
    floor = -float(len(merges))
    return {piece: scores.get(piece, floor - i) for piece, i in vocab.items()}


def _entries(tok: dict[str, Any], path: Path, size: int, normal: Any) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp types by id over `size` ids (unused ids padded); `normal(text)` types
    a vocabulary piece, added tokens are control (special) or user-defined."""
    tokens: list[str | None] = [None] * size
    types = [gguf.TokenType.UNUSED] * size
    entries = [(i, t, normal(t)) for t, i in tok["model"]["vocab"].items()]
    entries += [(a["id"], a["content"], gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
                for a in tok.get("added_tokens", [])]
    for i, text, kind in entries:
        if i >= size:
            raise ConversionError(f"{path}: token {text!r} has id {i}, beyond the model's {size} embeddings")
        tokens[i], types[i] = text, kind
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)], [int(t) for t in types]


def read_vocab(store: Path, model: ModelConfig) -> Vocab:
    """The store's tokenizer.json (+ tokenizer_config.json) as a llama.cpp vocabulary of `vocab_size`."""
    path = Path(store) / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{path}: missing; a GGUF needs the tokenizer (convert from a checkpoint that has one)")
    tok = json.loads(path.read_text(encoding="utf-8"))
    cfg_path = Path(store) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
    bpe = tok.get("model", {})
    eos_ids = model.eos_token_ids
    common = dict(
        bos=_token_id(tok, cfg, "bos_token") if cfg.get("bos_token") else model.bos_token_id,
        eos=_token_id(tok, cfg, "eos_token") if cfg.get("eos_token") else (eos_ids[0] if eos_ids else None),
        add_bos=_adds_bos(tok, cfg),
        chat_template=cfg.get("chat_template") if isinstance(cfg.get("chat_template"), str) else None,
    )
    prefix = _sentencepiece_layout(tok)
    if prefix is not None:
        return _sentencepiece_vocab(tok, cfg, path, model.vocab_size, prefix, common)
    byte_level = "bytelevel" in " ".join(_steps(tok.get("pre_tokenizer"))) or (
        (tok.get("decoder") or {}).get("type") == "ByteLevel")
    if bpe.get("type") != "BPE" or not byte_level:
        raise ConversionError(f"{path}: GGUF export writes byte-level BPE and SentencePiece BPE (byte fallback) "
                              f"tokenizers; this one is {bpe.get('type')} with neither")
    tokens, types = _entries(tok, path, model.vocab_size, lambda _: gguf.TokenType.NORMAL)
    merges = _merge_pairs(bpe)
    if not merges:
        log.warning("%s has no BPE merges: llama.cpp refuses a gpt2 vocabulary without them", path)
    steps = _steps(tok.get("pre_tokenizer"))
    pre = _PRE.get(steps)
    if pre is None:
        log.warning("%s: pre-tokenizer %s is not one export recognises; writing llama.cpp's 'default', so "
                    "llama.cpp may split text differently than transformers", path, steps)
        pre = "default"
    return Vocab(tokens=tokens, types=types, merges=merges, pre=pre, **common)


def _sentencepiece_vocab(tok: dict[str, Any], cfg: dict[str, Any], path: Path, size: int, prefix: bool,
                         common: dict[str, Any]) -> Vocab:
    """llama.cpp's "llama" vocabulary: pieces, `spm_scores`, types (byte pieces <0xXX>, the unknown piece)."""
    bpe = tok["model"]
    unk_text = bpe.get("unk_token")
    unk = bpe["vocab"].get(unk_text) if unk_text else None

    def normal(text: str) -> int:
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return gguf.TokenType.BYTE
        return gguf.TokenType.UNKNOWN if text == unk_text else gguf.TokenType.NORMAL

    tokens, types = _entries(tok, path, size, normal)
    if unk is not None:  # also when listed as an added special token
        types[unk] = int(gguf.TokenType.UNKNOWN)
    by_piece = spm_scores(bpe["vocab"], _merge_pairs(bpe))
    added = {a["content"] for a in tok.get("added_tokens", [])}
    scores = [0.0 if t in added or types[i] != gguf.TokenType.NORMAL else by_piece.get(t, 0.0)
              for i, t in enumerate(tokens)]
    return Vocab(tokens=tokens, types=types, merges=[], pre="default", kind="llama", scores=scores, unk=unk,
                 add_space_prefix=prefix, **common)
