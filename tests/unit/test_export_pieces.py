"""Pure pieces of `d2moe export`: shard planning, GGUF expert codecs, tokenizer recognition, refusals."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch

from d2moe.config import ModelConfig, MWQConfig, RopeScaling
from d2moe.convert.families import ConversionError
from d2moe.export.atomic import atomic_output, check_free
from d2moe.export.gguf_arch import arch_for
from d2moe.export.gguf_quant import encode_expert, expert_type
from d2moe.export.gguf_vocab import read_vocab
from d2moe.export.hf import shard_names, shard_plan
from d2moe.export.names import family_named
from d2moe.quant.mwq import quantize
from d2moe.quant.pack import ExpertLayout, dequantize_packed, pack_expert, unpack_expert


def test_shard_plan_fills_in_order_and_never_empties():
    sizes = [("a", 4), ("b", 4), ("c", 9), ("d", 1), ("e", 2)]
    assert shard_plan(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]  # an oversized tensor gets its own shard
    assert shard_plan(sizes, 100) == [["a", "b", "c", "d", "e"]]
    assert shard_names(1) == ["model.safetensors"]
    assert shard_names(2) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def _expert(method: str, group_size: int = 64):
    cfg = MWQConfig(method=method, group_size=group_size)
    layout = ExpertLayout.swiglu(128, 64, cfg)
    g = torch.Generator().manual_seed(1)
    ws = {"w1": torch.randn(64, 128, generator=g) * 0.05 + 0.02, "w3": torch.randn(64, 128, generator=g) * 0.05,
          "w2": torch.randn(128, 64, generator=g) * 0.05}
    return layout, pack_expert(layout, {n: quantize(w, cfg) for n, w in ws.items()})


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_gguf_holds_msb_grid_exactly(bits):
    """Q4_1 / Q5_1 from the grid: only the offset's float16 rounding moves a weight (<< one grid step)."""
    layout, blob = _expert("msb")
    for name in ("w1", "w2"):
        pm = unpack_expert(layout, blob, bits)[name]
        ref = dequantize_packed(pm, bits).numpy()
        got = gguf.quants.dequantize(encode_expert(pm, bits, expert_type(bits)), expert_type(bits))
        step = pm.base_scale.float().max().item() * 2.0 ** (2 - bits)
        assert np.abs(got - ref).max() < 0.01 * step


def test_gguf_other_layouts_are_rounded_by_gguf():
    """Residual planes (not a uniform grid) and groups smaller than a block: gguf's own rounding, within a
    Q4_1 step of the block's range / 15."""
    for method, gs in (("residual", 64), ("msb", 16)):
        layout, blob = _expert(method, gs)
        pm = unpack_expert(layout, blob, 4)["w3"]
        ref = dequantize_packed(pm, 4).numpy()
        got = gguf.quants.dequantize(encode_expert(pm, 4, gguf.GGMLQuantizationType.Q4_1),
                                     gguf.GGMLQuantizationType.Q4_1)
        blocks = ref.reshape(ref.shape[0], -1, 32)
        half = (blocks.max(-1) - blocks.min(-1))[..., None] / 30 * 1.01 + 1e-6
        assert (np.abs(got - ref).reshape(blocks.shape) <= half).all()


def _tokenizer(tmp_path, pre: dict, model: str = "BPE") -> None:
    vocab = {"a": 0, "b": 1, "ab": 2}
    tok = {"model": {"type": model, "vocab": vocab, "merges": [["a", "b"]]}, "pre_tokenizer": pre,
           "decoder": {"type": "ByteLevel"}, "added_tokens": [{"id": 3, "content": "<|end|>", "special": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>", "chat_template": "{{x}}"}))


_TINY = ModelConfig(family="qwen3_moe", vocab_size=6, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, num_experts=2, top_k=1, expert_intermediate=8, qk_norm="head")
_QWEN2_SPLIT = {"type": "Split", "pattern": {"Regex": (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")}}


@pytest.mark.parametrize(("pre", "name"), [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [_QWEN2_SPLIT, {"type": "ByteLevel", "use_regex": False}]}, "qwen2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {"type": "ByteLevel", "use_regex": False}]},
     "default"),
])
def test_vocab_recognises_pre_tokenizers(tmp_path, pre, name):
    _tokenizer(tmp_path, pre)
    v = read_vocab(tmp_path, _TINY)
    assert v.pre == name
    assert v.tokens == ["a", "b", "ab", "<|end|>", "[PAD4]", "[PAD5]"] and v.types == [1, 1, 1, 3, 5, 5]
    assert v.merges == ["a b"] and v.eos == 3 and v.chat_template == "{{x}}"


def test_vocab_refuses_sentencepiece_and_oversized(tmp_path):
    _tokenizer(tmp_path, {"type": "Metaspace"}, model="Unigram")
    with pytest.raises(ConversionError, match="byte-level BPE"):
        read_vocab(tmp_path, _TINY)
    _tokenizer(tmp_path, {"type": "ByteLevel"})
    with pytest.raises(ConversionError, match="beyond the model's 3 embeddings"):
        read_vocab(tmp_path, dataclasses.replace(_TINY, vocab_size=3))


@pytest.mark.parametrize(("change", "why"), [
    (dict(family="deepseek_v2"), "gguf export supports Mixtral"),
    (dict(norm_topk_prob=False), "norm_topk_prob=False"),
    (dict(rope_scaling=RopeScaling(factor=4.0, original_max_position=64)), "rope_scaling"),
    (dict(shared_expert_intermediate=8), "a shared expert"),
])
def test_gguf_refuses_what_llamacpp_does_not_compute(change, why):
    assert arch_for(_TINY).name == "qwen3moe"
    with pytest.raises(ConversionError, match=why):
        arch_for(dataclasses.replace(_TINY, **change))


def test_builtin_model_cannot_be_exported():
    with pytest.raises(ConversionError, match="built-in MoEfied SmolLM2"):
        family_named("moefied_llama")


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "m"
    with pytest.raises(RuntimeError), atomic_output(out, directory=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()  # an empty directory may be replaced
    with atomic_output(out, directory=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["config.json"] and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileExistsError, match="not empty"):
        check_free(out, directory=True)
    with pytest.raises(FileExistsError, match="is a directory"):
        check_free(out, directory=False)
