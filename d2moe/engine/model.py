"""Opens a store as a runnable model: dense weights resident, experts through the byte-budgeted cache."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from d2moe.cache.expert_cache import ExpertCache
from d2moe.config import ModelConfig
from d2moe.cache.store_provider import StoreExpertProvider
from d2moe.models.decoder import MoEDecoder
from d2moe.storage.format import DENSE_FILE, StoreError
from d2moe.storage.reader import StoreReader


@dataclass
class LoadedModel:
    path: Path
    decoder: MoEDecoder
    reader: StoreReader
    cache: ExpertCache
    provider: StoreExpertProvider
    tokenizer: Tokenizer | None
    dense_bytes: int
    eos_ids: frozenset[int]  # from the model config and the tokenizer's eos_token

    @property
    def config(self) -> ModelConfig:
        return self.decoder.cfg

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise StoreError(f"{self.path}: no tokenizer.json in the store; convert from a checkpoint that has one")
        return self.tokenizer


def _load_tokenizer(path: Path) -> Tokenizer | None:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        return None
    try:
        return Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise StoreError(f"{tok_file}: cannot load tokenizer ({e})") from None


def _eos_from_tokenizer_config(path: Path, tok: Tokenizer | None) -> set[int]:
    cfg_file = path / "tokenizer_config.json"
    if tok is None or not cfg_file.is_file():
        return set()
    eos = json.loads(cfg_file.read_text()).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    tid = tok.token_to_id(eos) if isinstance(eos, str) else None
    return {tid} if tid is not None else set()


def open_model(path: Path, memory_budget: int | None = None) -> LoadedModel:
    """`memory_budget`: bytes of compressed experts the cache may hold (None: room for every expert at 8 bits)."""
    path = Path(path)
    reader = StoreReader(path)
    dense_path = path / DENSE_FILE
    try:
        dense = load_file(str(dense_path))
    except FileNotFoundError:
        raise StoreError(f"{dense_path}: missing; the store is incomplete") from None
    except Exception as e:
        raise StoreError(f"{dense_path}: cannot read ({e})") from None
    budget = memory_budget if memory_budget is not None else reader.total_expert_bytes(reader.max_bits)
    cache = ExpertCache(budget)
    provider = StoreExpertProvider(reader, cache)
    decoder = MoEDecoder(reader.config.model, dense, provider)
    tokenizer = _load_tokenizer(path)
    return LoadedModel(
        path=path,
        decoder=decoder,
        reader=reader,
        cache=cache,
        provider=provider,
        tokenizer=tokenizer,
        dense_bytes=sum(t.numel() * t.element_size() for t in dense.values()),
        eos_ids=frozenset(reader.config.model.eos_token_ids) | _eos_from_tokenizer_config(path, tokenizer),
    )
