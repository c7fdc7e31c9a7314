"""Conversion: unknown architectures, missing shards, bad configs; nothing half-written is left behind."""

from __future__ import annotations

import json
import shutil

import pytest

from d2moe.config import MWQConfig
from d2moe.convert.convert import convert, open_source
from d2moe.convert.families import ConversionError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_architecture(tiny_checkpoints, tmp_path):
    ck = _copy(tiny_checkpoints["mixtral"], tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="unsupported architecture.*GPTNeoX.*MixtralForCausalLM"):
        open_source(ck)


def test_missing_shard(tiny_checkpoints, tmp_path):
    ck = _copy(tiny_checkpoints["olmoe"], tmp_path / "ck")
    (ck / "model.safetensors").rename(ck / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="missing shard.*model-00002-of-00002"):
        open_source(ck)


def test_missing_expert_tensor_names_it(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = _copy(tiny_checkpoints["qwen3_moe"], tmp_path / "ck")
    t = load_file(str(ck / "model.safetensors"))
    del t["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(t, str(ck / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"layers\.1\.experts\.3\.w3"):
        open_source(ck)


def test_bad_group_size_leaves_nothing(tiny_checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="group size 48 does not divide"):
        convert(tiny_checkpoints["mixtral"], tmp_path / "out", MWQConfig(group_size=48), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_gptq_without_calibration_text_leaves_nothing(tiny_checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="gptq needs calibration text"):
        convert(tiny_checkpoints["mixtral"], tmp_path / "out", MWQConfig(method="gptq"), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_transformers4_style_config(tiny_checkpoints, tmp_path):
    """Hub checkpoints carry `rope_theta` (transformers 4); transformers 5 writes `rope_parameters`."""
    ck = _copy(tiny_checkpoints["qwen3_moe"], tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 12345.0
    cfg["num_experts"] = cfg.pop("num_local_experts")
    (ck / "config.json").write_text(json.dumps(cfg))
    src = open_source(ck)
    assert src.model.rope_theta == 12345.0 and src.model.num_experts == 4 and src.model.qk_norm == "head"


def test_interrupted_conversion_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    import d2moe.convert.convert as conv

    calls = {"n": 0}
    real = conv.pack_expert

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(conv, "pack_expert", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoints["mixtral"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []
