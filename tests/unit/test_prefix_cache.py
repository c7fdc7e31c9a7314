"""Prefix caching: chunk ends and keys are functions of the prompt alone, the cache keeps its capacity, and a
request that reuses cached chunks gets exactly the tokens and logprobs it gets without the cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2moe.config import EngineConfig
from d2moe.convert.convert import convert
from d2moe.engine.batcher import BatcherConfig
from d2moe.engine.engine import Engine
from d2moe.engine.memory import kv_cache_bytes
from d2moe.engine.model import open_model
from d2moe.engine.prefix_cache import MIN_SPLIT_GAP, PrefixCache, chain_keys, chunk_ends, policy_key
from d2moe.engine.request import EngineRequest
from d2moe.models.ragged import KVPool
from tiny_calibration import calibrate_randomly

SPLIT = 3  # a "special" token in the pure tests

ids_st = st.lists(st.integers(0, 5), min_size=1, max_size=60)


@given(ids_st, st.integers(1, 9))
def test_chunk_ends_are_a_function_of_the_prefix(ids, chunk):
    ends = chunk_ends(ids, chunk, frozenset({SPLIT}))
    assert ends == sorted(set(ends)) and ends[-1] == len(ids) and 0 not in ends
    assert all(m in ends for m in range(chunk, len(ids), chunk))
    for i, t in enumerate(ids):  # a split token ends a chunk unless the last end is nearer than the gap
        if i and t == SPLIT:
            assert i in ends or i - max([0] + [e for e in ends if e < i]) < MIN_SPLIT_GAP
    for e in ends:  # a prompt that stops at a chunk end was cut the same way up to there
        assert chunk_ends(ids[:e], chunk, frozenset({SPLIT})) == [x for x in ends if x <= e]
    assert all(b - a <= chunk for a, b in zip([0] + ends, ends))


@given(ids_st, st.integers(1, 9), st.data())
def test_chain_keys_name_the_whole_prefix(ids, chunk, data):
    ends = chunk_ends(ids, chunk)
    keys = chain_keys(ids, ends, policy_key(8, None))
    e = data.draw(st.sampled_from(ends))
    assert chain_keys(ids[:e], chunk_ends(ids[:e], chunk), policy_key(8, None)) == keys[: ends.index(e) + 1]
    assert chain_keys(ids, ends, policy_key(4, None))[0] != keys[0]
    assert chain_keys(ids, ends, policy_key(8, 0.5))[0] != keys[0]
    i = data.draw(st.integers(0, len(ids) - 1))  # one token changed: its chunk and every later key change
    other = ids[:i] + [ids[i] + 1] + ids[i + 1 :]
    changed = chain_keys(other, ends, policy_key(8, None))
    first = next(n for n, end in enumerate(ends) if end > i)
    assert changed[:first] == keys[:first] and all(a != b for a, b in zip(changed[first:], keys[first:]))


class _Cfg:  # what KVPool needs of a model config
    num_layers, num_kv_heads, head_dim, attention, sliding_layers, chunked_layers = 2, 2, 4, "gqa", (), ()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.lists(st.tuples(st.integers(0, 6), st.integers(1, 12)), min_size=1, max_size=30))
def test_cache_stays_within_capacity_and_returns_what_it_kept(capacity, ops):
    pool = KVPool(_Cfg(), 2, 64)
    for layer in range(2):
        pool.k[layer].normal_()
        pool.v[layer].normal_()
    cache, kept = PrefixCache(capacity), {}
    for name, n in ops:
        key = bytes([name, n])
        cache.store(key, pool, 0, 0, n)
        if n <= capacity:
            kept[key] = n
        assert cache.used == sum(c.end - c.start for c in cache.chunks.values()) <= capacity
    for key, c in list(cache.chunks.items()):  # match refreshes recency (reorders)
        assert cache.match([key], [c.end], 64) == 1
        assert cache.restore([key], pool, 1) == c.end == kept[key]
        for layer in range(2):
            assert torch.equal(pool.k[layer][1, :, : c.end], pool.k[layer][0, :, : c.end])
            assert torch.equal(pool.v[layer][1, :, : c.end], pool.v[layer][0, :, : c.end])
    assert cache.match([b"never stored"], [1], 64) == 0 and cache.stats.misses == 1


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix") / "mixtral.d2m"
    convert(tiny_checkpoints["mixtral"], out, dense_dtype=torch.int8, progress=False)
    calibrate_randomly(out)
    return out


def _run(engine, reqs):
    for i, r in enumerate(reqs):
        engine.add(str(i), r)
    out = {str(i): ([], []) for i in range(len(reqs))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id][0].extend(o.token_ids)
            out[o.request_id][1].extend(lp.logprob for lp in o.logprobs)
    return [out[str(i)] for i in range(len(reqs))]


def _prompts(model):
    """Prompts sharing a 'system prompt' that ends before a split token, then differing."""
    enc = lambda s: list(model.tokenizer.encode(s).ids)  # noqa: E731
    shared = enc("You are a careful assistant who answers briefly and well.") + [SPLIT_ID]
    return [tuple(shared + enc(s)) for s in ("Who are you?", "What is two and two?", "Tell me a story")]


SPLIT_ID = 7


def _engine(model, prefix, max_batch=3, chunk=8):
    model.engine = EngineConfig(context=200, kv_slots=max_batch, prefix_cache=prefix)
    config = BatcherConfig(max_batch, chunk, chunk + max_batch, split_tokens=frozenset({SPLIT_ID}))
    return Engine(model, config, 200)


def test_reused_chunks_give_the_same_tokens_and_logprobs(store, one_thread):
    with open_model(store, EngineConfig(context=200, kv_slots=3)) as model:
        prompts = _prompts(model)
        widths = [(8, None), (8, None), (4, None)]
        reqs = [EngineRequest(p, 8, bits=b, price=c, stop_on_eos=False, logprobs=1) for p, (b, c) in zip(prompts, widths)]
        reference = [_run(_engine(model, 0, 1), [r])[0] for r in reqs]
        engine = _engine(model, 200, 1)
        got = [_run(engine, [r])[0] for r in reqs]  # one after the other: the second reuses the first's chunks
        assert got == reference
        stats = engine.prefix.stats
        common = max(e for e in chunk_ends(prompts[1], 8, frozenset({SPLIT_ID})) if prompts[1][:e] == prompts[0][:e])
        assert common >= prompts[0].index(SPLIT_ID) - MIN_SPLIT_GAP
        assert stats.hits == 1 and stats.reused_tokens == common  # the 4-bit request is another policy: no hit
        assert stats.misses == 2
        batched = _engine(model, 200, 3)
        _run(batched, [reqs[0]])
        assert _run(batched, reqs) == reference  # together, after the cache filled: every 8-bit one reuses
        assert batched.prefix.stats.hits == 2


def test_a_small_cache_evicts_and_stays_exact(store, one_thread):
    with open_model(store, EngineConfig(context=200, kv_slots=2)) as model:
        reqs = [EngineRequest(p, 6, stop_on_eos=False, logprobs=1) for p in _prompts(model)] * 2
        reference = [_run(_engine(model, 0, 1), [r])[0] for r in reqs]
        engine = _engine(model, 12, 2)
        assert [_run(engine, [r])[0] for r in reqs] == reference
        assert engine.prefix.used <= 12 and engine.prefix.stats.evicted_tokens > 0


def test_the_memory_plan_reserves_the_prefix_cache(store):
    with open_model(store, EngineConfig(context=64, prefix_cache=100)) as model:
        assert model.plan.prefix_cache == kv_cache_bytes(model.config, 100) > 0
    with open_model(store, EngineConfig(context=64)) as model:
        assert model.plan.prefix_cache == 0
