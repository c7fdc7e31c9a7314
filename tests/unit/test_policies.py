"""The peers' policies on one engine (engine/policies.py): width rules and transition prediction are pure
and tested alone; end to end, every policy that keeps the request's widths gives the synchronous path's
greedy tokens, matryoshka-free re-reads a width it already holds nested, EdgeMoE's static table and
HOBBIT's low-width misses change the widths actually computed."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import wait

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.cache.transitions import ExpertTransitions
from d2moe.config import EngineConfig
from d2moe.convert.convert import convert
from d2moe.engine.generate import Request, generate
from d2moe.engine.model import open_model
from d2moe.engine.policies import POLICIES, policy_spec
from d2moe.engine.sampling import SamplingParams
from d2moe.models.widths import HobbitRule, request_widths, static_widths
from d2moe.storage.reader import StoreReader

PROMPT = (5, 17, 33, 90, 4, 61, 7)


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    return convert(tiny_checkpoints["mixtral"], tmp_path_factory.mktemp("p") / "m.d2m", progress=False)


def _run(model, bits: int, n: int = 10) -> list[int]:
    return list(generate(model, Request(PROMPT, SamplingParams(max_tokens=n, stop_on_eos=False), bits)))


def _engine(**kw) -> EngineConfig:
    return EngineConfig(context=64, step_tokens=len(PROMPT), **kw)


def _minimum(store) -> int:
    with open_model(store, _engine()) as m:
        return m.plan.minimum


# ---- pure rules -------------------------------------------------------------------------------------------


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        EngineConfig(policy="fifo")
    assert set(POLICIES) >= {"d2moe", "lru", "hold", "matryoshka-free", "edgemoe", "hobbit"}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_hobbit_rule_properties(T, k, seed):
    g = torch.Generator().manual_seed(seed)
    E = 8
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weight = torch.rand(T, k, generator=g).softmax(-1)
    token_bits = torch.randint(2, 9, (T,), generator=g)
    resident = torch.randint(1, 9, (E,), generator=g)
    rule = HobbitRule()
    bits = rule(idx, weight, token_bits, resident)
    high = request_widths(idx, token_bits)
    kept = bits > 0
    assert (bits <= high).all()  # never above the request
    assert (bits[kept] >= 2).all()
    hit = resident[idx] >= high
    assert (bits[hit & kept] == high[hit & kept]).all()  # a hit runs at full width
    heavy = weight >= rule.low_weight
    assert (bits[heavy & kept] == high[heavy & kept]).all()  # heavy experts are never narrowed
    assert kept.any(dim=-1).all()  # the heaviest expert of every token always runs
    top = weight.argmax(-1)
    assert (bits.gather(-1, top[:, None]) > 0).all()
    # the kept experts' weight reaches skip_after, or every expert is kept
    assert ((weight * kept).sum(-1) >= rule.skip_after - 1e-6).logical_or(kept.all(-1)).all()


def test_hobbit_low_weight_miss_uses_what_is_resident():
    rule = HobbitRule(low_weight=0.3, skip_after=1.1)
    idx = torch.tensor([[0, 1, 2]])
    weight = torch.tensor([[0.6, 0.2, 0.2]])
    resident = torch.tensor([1, 6, 1])  # expert 1 at 6 bits, expert 2 absent
    assert rule(idx, weight, torch.tensor([8]), resident).tolist() == [[8, 6, 4]]


def test_static_widths_cap_the_request():
    idx = torch.tensor([[0, 3], [2, 1]])
    table = torch.tensor([8, 2, 4, 3])
    assert static_widths(idx, torch.tensor([6, 8]), table).tolist() == [[6, 3], [4, 2]]


def test_transitions_predict_the_likeliest_successors():
    t = ExpertTransitions(3, 6)
    for _ in range(3):
        t.observe(1, [0, 1], [4, 5])
    t.observe(1, [0], [2])
    assert t.predict(1, [0], 2) == [2, 4] or t.predict(1, [0], 2) == [4, 5]
    assert t.predict(1, [0, 1], 2) == [4, 5]
    assert t.predict(2, [0], 2) == []  # never seen
    assert t.predict(0, [0], 2) == []  # no layer before the first


# ---- end to end -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [p for p in POLICIES if policy_spec(p).widths != "hobbit"])
def test_policies_keeping_the_request_width_give_the_same_tokens(store, policy, one_thread):
    with open_model(store, _engine(policy="lru")) as m:
        ref = _run(m, 8)
    low = _minimum(store) + 2 * StoreReader(store).config.layout.prefix_bytes(8)
    for budget in ([None] if policy == "hold" else [None, low]):
        with open_model(store, _engine(policy=policy, memory_budget=budget)) as m:
            assert _run(m, 8) == ref, (policy, budget)


def test_matryoshka_free_rereads_what_nesting_reuses(store, one_thread):
    read = {}
    for policy in ("d2moe", "matryoshka-free"):
        with open_model(store, _engine(policy=policy)) as m:
            _run(m, 8)
            wait(list(m.provider.inflight.values()))  # a wrong guess's prefetch may still be landing
            before = m.expert_bytes_read()
            _run(m, 4)  # every expert it needs is resident at 8 bits
            read[policy] = m.expert_bytes_read() - before
    assert read["d2moe"] == 0
    assert read["matryoshka-free"] > 0


def test_edgemoe_static_table_sets_the_computed_widths(store, tmp_path, one_thread):
    copy = tmp_path / "cal.d2m"
    shutil.copytree(store, copy)
    cfg = StoreReader(copy).config.model
    tables = {str(layer): [2] * cfg.num_experts for layer in cfg.moe_layers}
    (copy / "calibration.json").write_text(json.dumps({"static_widths": tables}))
    with open_model(copy, _engine(policy="lru")) as m:
        ref = _run(m, 2)
    with open_model(copy, _engine(policy="edgemoe")) as m:
        assert _run(m, 8) == ref  # every expert capped at 2 bits
        assert set(m.provider.stats.widths) == {2}


def test_hobbit_reads_low_weight_misses_at_low_width(store, one_thread):
    low = _minimum(store) + 2 * StoreReader(store).config.layout.prefix_bytes(8)
    with open_model(store, _engine(policy="hobbit", memory_budget=low)) as m:
        toks = _run(m, 8, n=12)
        widths = m.provider.stats.widths
    assert len(toks) == 12
    narrowed = sum(n for b, n in widths.items() if b < 8)
    assert widths[8] > 0 and narrowed > 0, widths  # misses of low gate weight ran narrower
    assert min(widths) >= 4  # never below the low width (8 // 2)
