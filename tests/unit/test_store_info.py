"""`d2moe info`: what a store holds, read without loading weights, and a minimum budget that really runs."""

from __future__ import annotations

import json

import pytest
import torch

from d2moe.cache.expert_cache import BudgetError
from d2moe.cli import main
from d2moe.config import EngineConfig, MWQConfig
from d2moe.convert.convert import convert
from d2moe.engine.model import open_model
from d2moe.engine.store_info import format_info, store_info


@pytest.fixture(scope="module")
def v3_store(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("info") / "v3.d2m"
    return convert(tiny_checkpoints["deepseek_v3"], out, MWQConfig(), dense_dtype=torch.int8, progress=False)


def test_info_describes_the_model(v3_store):
    info = store_info(v3_store, context=64)
    assert (info["family"], info["layers"], info["moe_layers"], info["dense_layers"]) == ("deepseek_v3", 3, 2, [0])
    assert (info["experts"], info["top_k"], info["shared_experts"]) == (8, 2, {"intermediate": 128, "gated": False})
    assert info["routing"] == {"scoring": "sigmoid", "normalized": True, "choice_bias": True, "scaling_factor": 2.5,
                               "groups": {"count": 4, "chosen": 2, "score": "top2"}}
    assert info["attention"]["kind"] == "mla" and info["kv_cache_bytes_per_token"] == 3 * (32 + 8) * 4
    sizes = [info["bytes_per_expert"][str(b)] for b in range(2, 9)]
    assert sizes == sorted(sizes) and info["expert_bytes"]["8"] == 2 * 8 * sizes[-1]
    assert info["calibrated"] is False


def test_minimum_budget_runs_and_one_byte_less_does_not(v3_store):
    info = store_info(v3_store, context=64)
    engine = EngineConfig(memory_budget=info["min_memory_budget"], context=64)
    with open_model(v3_store, engine) as model:
        assert model.dense_bytes == info["dense_bytes"]  # the header's count is what loading holds
        ids = torch.randint(3, 256, (1, 8))
        assert torch.isfinite(model.decoder.forward(ids, model.decoder.new_cache(1, 64), bits=2)).all()
    with pytest.raises(BudgetError, match="below the minimum"):
        open_model(v3_store, EngineConfig(memory_budget=info["min_memory_budget"] - 1, context=64))


def test_info_cli_human_and_json(v3_store, capsys, tmp_path):
    assert main(["info", "--model", str(v3_store)]) == 0
    text = capsys.readouterr().out
    for line in ("family:        deepseek_v3", "layers:        3 (2 MoE, 1 dense: 0)", "calibrated:    no",
                 "shared expert: intermediate 128, resident", "min budget:"):
        assert line in text
    assert main(["info", "--model", str(v3_store), "--json", "--context", "128"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["context"] == 128 and info["min_memory_budget"] == store_info(v3_store, 128)["min_memory_budget"]


def test_info_sees_calibration(v3_store, tmp_path):
    import shutil

    store = shutil.copytree(v3_store, tmp_path / "s")
    (store / "calibration.json").write_text(json.dumps({"tiers": {"high": {"price": 0.1}, "fast": {"price": 1.0}}}))
    info = store_info(store)
    assert info["calibrated"] is True and info["tiers"] == ["fast", "high"]
    assert info["next_guess"] == "router" and "next-layer guess by the router" in format_info(info)


def test_calibrate_a_non_swiglu_family_then_info_sees_it(tiny_checkpoints, tmp_path):
    """Calibration prices widths through the family's own expert (GPT-OSS: biases, clamped activation,
    sinks in the teacher's attention); `info` then reports the store calibrated with its tiers."""
    from d2moe.routing.calibrate import calibrate
    from d2moe.routing.fit import FitConfig

    store = convert(tiny_checkpoints["gpt_oss"], tmp_path / "g.d2m", MWQConfig(), progress=False)
    with open_model(store) as m:
        ids = torch.randint(3, 256, (128,), generator=torch.Generator().manual_seed(0)).tolist()
        calibrate(m, ids, tokens=128, context=32, fit=FitConfig(steps=5))
    info = store_info(store, 64)
    assert info["calibrated"] is True and info["tiers"] and info["next_guess"] == "fitted"
    assert "next-layer guess fitted" in format_info(info)
    with open_model(store, EngineConfig(memory_budget=info["min_memory_budget"], context=64)) as m:
        assert m.plan.minimum == info["min_memory_budget"]  # the fitted guess is counted in both
