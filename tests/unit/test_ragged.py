"""Continuous batching is batch-invariant: a sequence's greedy tokens (and logits) are the same whatever
runs beside it, at mixed widths and router-two prices; fast paths against their references."""

from __future__ import annotations

import pytest
import torch

from d2moe.config import EngineConfig
from d2moe.convert.convert import convert
from d2moe.engine.batcher import BatcherConfig
from d2moe.engine.engine import Engine
from d2moe.engine.generate import Request, generate
from d2moe.engine.model import open_model
from d2moe.engine.request import EngineRequest
from d2moe.engine.sampling import SamplingParams
from d2moe.engine.threads import ThreadGovernor, ThreadPolicy
from d2moe.models.dense import quantize_int8
from d2moe.models.ragged import KVPool, Segment, StepPlan, attend_decode_padded, attend_per_sequence, invariant_rows
from tiny_calibration import calibrate_randomly


@pytest.fixture(scope="module", params=["int8", "float32"])
def store(request, tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("ragged") / f"mixtral-{request.param}.d2m"
    dtype = torch.int8 if request.param == "int8" else torch.float32
    convert(tiny_checkpoints["mixtral"], out, dense_dtype=dtype, progress=False)
    calibrate_randomly(out)
    return out


PROMPTS = ["Hello there, general", "To be, or not", "x", "The quick brown fox jumps over the lazy dog. " * 3,
           "abc", "Once upon a time in a land far away", "0123456789", "Why?"]
WIDTHS = [("bits", 8), ("tier", "balanced"), ("bits", 4), ("tier", "fast"), ("bits", 2), ("tier", "high"),
          ("tier", "max"), ("bits", 6)]


def _requests(model, n=8, max_tokens=12):
    tok = model.tokenizer
    out = []
    for i in range(n):
        kind, value = WIDTHS[i % len(WIDTHS)]
        choice = model.width_choice(bits=value) if kind == "bits" else model.width_choice(tier=value)
        out.append(EngineRequest(tuple(tok.encode(PROMPTS[i % len(PROMPTS)]).ids), max_tokens, bits=choice.bits,
                                 price=choice.price, stop_on_eos=False, logprobs=2))
    return out


def _run(model, reqs, max_batch, chunk=8, padded=False, governor=None):
    engine = Engine(model, BatcherConfig(max_batch, chunk, chunk + max_batch), 200, padded_attention=padded)
    if governor is not None:  # a test's own probe schedule
        engine.governor = governor
    for i, r in enumerate(reqs):
        engine.add(str(i), r)
    tokens = {str(i): [] for i in range(len(reqs))}
    logprobs = {str(i): [] for i in range(len(reqs))}
    while engine.has_work():
        for o in engine.step():
            tokens[o.request_id] += o.token_ids
            logprobs[o.request_id] += [lp.logprob for lp in o.logprobs]
    return tokens, logprobs


def test_eight_mixed_width_requests_equal_each_alone(store, one_thread):
    with open_model(store, EngineConfig(context=200, kv_slots=8)) as model:
        reqs = _requests(model)
        assert len({(r.bits, r.price) for r in reqs}) >= 6  # fixed widths and router-two prices mixed
        alone = [_run(model, [r], 1) for r in reqs]
        together = _run(model, reqs, 8)
        for i in range(len(reqs)):
            assert together[0][str(i)] == alone[i][0]["0"], f"request {i} changed in the batch"
            assert together[1][str(i)] == alone[i][1]["0"]  # bit-identical logprobs, not just tokens
        assert any(r.price is not None for r in reqs) and model.decoder.width_hist[2:8].sum() > 0


def test_engine_alone_matches_generate_on_fixed_widths(store, one_thread):
    """The single-request loop and the batched engine agree on greedy tokens at fixed widths."""
    with open_model(store, EngineConfig(context=200, kv_slots=1)) as model:
        ids = tuple(model.tokenizer.encode(PROMPTS[0]).ids)
        ref = list(generate(model, Request(ids, SamplingParams(10, stop_on_eos=False), 4)))
        got, _ = _run(model, [EngineRequest(ids, 10, bits=4, stop_on_eos=False)], 1)
        assert got["0"] == ref


def test_padded_decode_attention_matches_reference():
    torch.manual_seed(0)
    from d2moe.config import ModelConfig

    cfg = ModelConfig(family="t", vocab_size=8, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      head_dim=16)
    pool = KVPool(cfg, 6, 40)
    pool.k[0].normal_()
    pool.v[0].normal_()
    starts = [5, 17, 0, 33, 9]
    segs = [Segment(s, st, i, 1, True) for i, (s, st) in enumerate(zip([4, 0, 2, 1, 5], starts))]
    segs.append(Segment(3, 4, 5, 6, False))  # a prefill chunk after the decode rows
    plan = StepPlan(tuple(segs))
    q = torch.randn(plan.rows, 4, 16)
    ref = attend_per_sequence(q, pool, 0, plan, True)
    fast = attend_decode_padded(q, pool, 0, plan, True)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_decode_padded_engine_tokens_match(store, one_thread):
    with open_model(store, EngineConfig(context=200, kv_slots=4)) as model:
        reqs = [r for r in _requests(model, 4, 8) if r.price is None]
        assert _run(model, reqs, 4, padded=True)[0] == _run(model, reqs, 4)[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "int8"])
def test_invariant_rows_hold(dtype):
    """The row counts models/ragged.py relies on: each row's bits do not depend on the call's row count."""
    from d2moe.models.layers import linear

    torch.manual_seed(0)
    w = torch.randn(96, 64)
    w = quantize_int8(w) if dtype == "int8" else w.to(dtype)
    limit = min(invariant_rows(w), 40)
    x = torch.randn(limit, 64)
    alone = torch.cat([linear(x[i : i + 1], w) for i in range(limit)])
    assert torch.equal(linear(x, w), alone)


def test_step_plan_blocks():
    segs = (Segment(0, 9, 0, 1, True), Segment(1, 3, 1, 1, True), Segment(2, 0, 2, 5, False),
            Segment(3, 8, 7, 2, False))
    plan = StepPlan(segs)
    assert plan.blocks(1) == [(0, 1), (1, 2), (2, 7), (7, 9)]
    assert plan.blocks(31) == [(0, 2), (2, 7), (7, 9)]
    assert plan.positions().tolist() == [9, 3, 0, 1, 2, 3, 4, 8, 9]
    with pytest.raises(ValueError):
        StepPlan((Segment(2, 0, 0, 5, False), Segment(0, 9, 5, 1, True)))


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_kv_pool_has_the_single_request_cache_layout(attention):
    """KVPool holds per slot what KVCache holds per sequence (MLA: its latent as one head, no values)."""
    from d2moe.config import ModelConfig
    from d2moe.models.layers import KVCache

    mla = dict(attention="mla", q_lora_rank=0, kv_lora_rank=32, qk_rope_head_dim=8) if attention == "mla" else {}
    cfg = ModelConfig(family="t", vocab_size=8, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=24, **mla)
    pool, cache = KVPool(cfg, 3, 40), KVCache(cfg, 3, 40)
    assert [t.shape for t in pool.k + pool.v] == [t.shape for t in cache.k + cache.v]
    assert KVPool.nbytes_for(cfg, 3, 40) == cache.nbytes()


def test_decode_steps_in_one_attention_call_give_the_op_by_op_logprobs(store, one_thread, monkeypatch):
    """A step of decode rows takes one kernel call for its attention (`layers.decode_rows_kernel`): the same
    tokens and bit-identical logprobs as the op-by-op path, batched and alone."""
    from d2moe.models import layers, ragged

    calls = []
    real = layers.decode_rows_kernel
    with open_model(store, EngineConfig(context=200, kv_slots=8)) as model:
        reqs = _requests(model, n=5, max_tokens=8)
        monkeypatch.setattr(ragged, "decode_rows_kernel", lambda *a: (o := real(*a)) is not None and calls.append(1) or o)
        fast = _run(model, reqs, 5)
        assert calls  # decode steps took the kernel
        monkeypatch.setattr(ragged, "decode_rows_kernel", lambda *a: None)
        assert _run(model, reqs, 5) == fast


def test_engine_switching_threads_gives_the_same_tokens(store) -> None:
    """A governor that changes the count every few steps leaves every token and logprob as one thread gives,
    where d2moe's kernels compute every matrix (int8 dense: the converter's default). torch's fp32 GEMM sums
    in an order that depends on its thread count, so a float32-dense store is not held to this."""
    if "float32" in store.name:
        pytest.skip("fp32 dense matrices run on torch's GEMM, whose bits depend on the thread count")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with open_model(store, EngineConfig(context=200, kv_slots=4)) as model:
            reqs = _requests(model, n=4, max_tokens=10)
            fixed = _run(model, reqs, 4)
        torch.set_num_threads(2)
        gov = ThreadGovernor(ThreadPolicy(2, every=2, probe=2))
        with open_model(store, EngineConfig(context=200, kv_slots=4, adaptive_threads=True)) as model:
            switching = _run(model, reqs, 4, governor=gov)
        assert switching == fixed
        assert set(gov.times) == {1, 2}  # both counts ran
    finally:
        torch.set_num_threads(old)
