"""`d2moe info` on a Hugging Face checkpoint that is not converted: its estimate against the store `convert`
then makes (expert bytes exactly, dense bytes within the float32 routers and norms convert keeps)."""

from __future__ import annotations

import json

import pytest
import torch

from d2moe.cli import main
from d2moe.config import MWQConfig
from d2moe.convert.convert import convert
from d2moe.engine.checkpoint_info import checkpoint_info, routed_expert_params
from d2moe.engine.store_info import store_info


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "gpt_oss", "llama4", "qwen2_moe"])
def test_estimate_matches_the_converted_store(tiny_checkpoints, tmp_path, family):
    import transformers

    src = tiny_checkpoints[family]
    est = checkpoint_info(src, context=64, group_size=32)
    real = store_info(convert(src, tmp_path / "s", MWQConfig(group_size=32), progress=False), context=64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert est["parameters"] == sum(p.numel() for p in hf.parameters())
    assert est["expert_bytes"] == real["expert_bytes"] and est["bytes_per_expert"] == real["bytes_per_expert"]
    assert est["family"] == real["family"] and est["kv_cache_bytes_per_token"] == real["kv_cache_bytes_per_token"]
    dense = est["dense_bytes"]["float32"]  # tiny checkpoints are saved in float32
    assert dense <= real["dense_bytes"] <= dense * 1.02 + 4096
    low = est["min_memory_budget"]["float32"]
    assert low <= real["min_memory_budget"] <= low * 1.02
    assert est["dense_bytes"]["int8"] < dense / 2


def test_routed_expert_params_of_a_real_shape():
    """Mixtral-8x7B: 32 layers x 8 experts x 3 x 4096 x 14336 = 45.1 B of its 46.7 B."""
    from d2moe.convert.families import family_for

    hf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_local_experts": 8, "num_experts_per_tok": 2,
          "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000}
    fam = family_for(hf)
    assert routed_expert_params(fam.config_fn(hf, fam.name)) == 45_097_156_608
    info = checkpoint_info("Mixtral-8x7B", hf=hf)
    assert info["parameters"] == 46_702_792_704 and info["expert_bytes"]["8"] > info["expert_bytes"]["4"]


def test_cli_on_a_checkpoint_and_on_bad_input(tiny_checkpoints, tmp_path, capsys):
    src = tiny_checkpoints["mixtral"]
    assert main(["info", "--model", str(src), "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "not converted" in out and "8 bits:" in out and "min budget:" in out
    assert main(["info", "--model", str(src / "config.json"), "--group-size", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "mixtral"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    for path, why in ((bad, "not valid JSON"), (tmp_path / "missing", "no such file"),
                      (tmp_path / "empty", "neither a d2moe store nor")):
        assert main(["info", "--model", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("d2moe: error:") and err.count("\n") == 1 and why in err, err
