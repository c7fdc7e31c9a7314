"""Benchmark model builders: the random Mixtral (benchmarks/checkpoints.py) converts and gives finite logits."""

from __future__ import annotations

import json

import torch


def test_random_mixtral_converts_with_finite_logits(tmp_path):
    from benchmarks.checkpoints import build_random_mixtral
    from d2moe.config import MWQConfig
    from d2moe.convert.convert import convert
    from d2moe.engine.model import open_model

    hf = build_random_mixtral(tmp_path / "hf", hidden=64, intermediate=128, layers=2, experts=4, top_k=2, seed=1,
                              heads=4, kv_heads=2, head_dim=16, vocab_size=256)
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (64, 4, 2)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard for embeddings/head, one per layer
    store = convert(hf, tmp_path / "m.d2m", MWQConfig(), dense_dtype=torch.int8, progress=False)
    with open_model(store) as m:
        ids = torch.tensor([[1, 5, 9, 42, 200]])
        logits = m.decoder.forward(ids, m.decoder.new_cache(1, 16), bits=8)
    assert logits.shape[-1] == 256 and torch.isfinite(logits).all() and logits.std() > 0
