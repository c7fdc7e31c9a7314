"""The batcher alone: admission into KV slots, chunked prefill on fixed boundaries, finishing, abort."""

from __future__ import annotations

import pytest

from d2moe.config import ModelConfig
from d2moe.engine.batcher import Batcher, BatcherConfig, Sequence
from d2moe.engine.request import EngineRequest
from d2moe.models.ragged import KVPool

CFG = ModelConfig(family="t", vocab_size=32, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8)


def batcher(max_batch=2, chunk=4, step=8, max_len=64) -> Batcher:
    return Batcher(BatcherConfig(max_batch, chunk, step), KVPool(CFG, max_batch, max_len))


def seq(i: int, prompt_len: int = 3, max_tokens: int = 2, **kw) -> Sequence:
    return Sequence(str(i), EngineRequest(tuple(range(1, prompt_len + 1)), max_tokens, **kw))


def sampled(batch, token=7):
    return {c.seq_id: token for c in batch.chunks if c.sample}


def test_admission_waits_for_a_free_slot_and_abort_frees_it():
    b = batcher(max_batch=2)
    for i in range(3):
        b.add(seq(i))
    batch = b.schedule()
    assert [c.seq_id for c in batch.chunks] == ["0", "1"] and len(b.waiting) == 1
    assert b.pool.free_slots == 0
    b.abort("0")
    assert b.pool.free_slots == 1 and "0" not in b.running
    b.update(batch, sampled(batch))  # a chunk of an aborted sequence is ignored
    batch = b.schedule()
    assert {c.seq_id for c in batch.chunks} == {"1", "2"}
    assert b.abort("missing") is None


@pytest.mark.parametrize("multi", [False, True])
def test_prefill_in_fixed_chunks_then_decode(multi):
    b = Batcher(BatcherConfig(1, 4, 8, multi_chunk=multi), KVPool(CFG, 1, 64))
    b.add(seq(0, prompt_len=10, max_tokens=3))
    steps = []
    while True:
        batch = b.schedule()
        if batch.chunks[0].decode:
            break
        steps.append([(c.start, len(c.tokens), c.sample) for c in batch.chunks])
        b.update(batch, sampled(batch))
    if multi:  # as many whole chunks as the step's 8 rows hold
        assert steps == [[(0, 4, False), (4, 4, False)], [(8, 2, True)]]
    else:
        assert steps == [[(0, 4, False)], [(4, 4, False)], [(8, 2, True)]]
    (c,) = batch.chunks
    assert c.start == 10 and c.tokens == (7,)  # the token sampled after the prompt is fed back


def test_chunks_also_end_before_split_tokens():
    b = Batcher(BatcherConfig(1, 16, 32, split_tokens=frozenset({9})), KVPool(CFG, 1, 64))
    b.add(Sequence("0", EngineRequest((1,) * 10 + (9,) + (2,) * 3, 1)))
    batch = b.schedule()
    assert [(c.start, len(c.tokens)) for c in batch.chunks] == [(0, 10), (10, 4)]


def test_long_prompt_cannot_starve_decoding():
    b = batcher(max_batch=2, chunk=4, step=5)
    b.add(seq(0, prompt_len=2, max_tokens=50))
    batch = b.schedule()
    b.update(batch, sampled(batch))  # seq 0 now decodes
    b.add(seq(1, prompt_len=40, max_tokens=1))
    for _ in range(5):
        batch = b.schedule()
        kinds = [(c.seq_id, c.decode, len(c.tokens)) for c in batch.chunks]
        assert kinds[0] == ("0", True, 1) and kinds[1][0] == "1" and kinds[1][2] == 4
        b.update(batch, sampled(batch))


def test_finishing_by_length_and_eos_frees_slots():
    b = batcher(max_batch=2)
    b.add(seq(0, max_tokens=1))
    b.add(seq(1, max_tokens=5))
    batch = b.schedule()
    done = b.update(batch, {"0": 9, "1": 2}, eos_ids=frozenset({2}))
    assert {(s.id, s.finish_reason) for s in done} == {("0", "length"), ("1", "stop")}
    assert b.pool.free_slots == 2 and not b.has_work()
    assert done[0].output == [9] or done[1].output == [9]


def test_scoring_request_finishes_after_its_prompt():
    b = batcher()
    b.add(seq(0, max_tokens=0, prompt_logprobs=True))
    batch = b.schedule()
    assert batch.chunks[0].all_logits
    (s,) = b.update(batch, {})
    assert s.finish_reason == "length" and s.output == []


def test_too_long_is_refused():
    b = batcher(max_len=8)
    with pytest.raises(ValueError, match="exceeds the context"):
        b.add(seq(0, prompt_len=6, max_tokens=3))
    b.add(seq(1))
    with pytest.raises(ValueError, match="already queued"):
        b.add(seq(1))
