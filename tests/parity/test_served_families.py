"""Every family serves: the continuous-batching step (models/ragged.py) runs each tiny parity checkpoint,
converted, and gives every sequence what the single-request decoder gives it.

One scenario per family and dense storage: three sequences at different widths in one KV pool, A and B
decoding at different lengths (B past GPT-OSS's sliding window and Llama 4's attention chunk), C prefilling
in two chunks that straddle them. Per sequence:
- bit-identical to the same sequence run alone through the batched step (batch invariance);
- its prefill rows bit-identical to `MoEDecoder.forward` prefilled in the same chunks;
- its decode rows equal to `MoEDecoder.forward` to rounding: a lone decode token there sums its experts in
  one kernel call, here in (expert, width) order (ragged.py's module doc). Measured max |diff|: 0 .. 9e-5
  with fp32 dense matrices; with int8 ones the head's bf16 activations can turn that into one bf16 ulp of a
  logit (8e-3).
"""

from __future__ import annotations

import pytest
import torch

from d2moe.config import EngineConfig
from d2moe.convert.convert import convert
from d2moe.engine.model import open_model
from d2moe.models.ragged import KVPool, Segment, StepPlan, ragged_forward
from tiny_hf import FAMILIES

DECODE_ATOL = {"source": 5e-4, "int8": 3e-2}
# (sequence, tokens [first, end), decode) per step; sequence lengths and widths below
STEPS = [[(0, 0, 5, False)], [(1, 0, 9, False)],
         [(0, 5, 6, True), (1, 9, 10, True), (2, 0, 6, False)],
         [(0, 6, 7, True), (1, 10, 11, True), (2, 6, 12, False)]]
LENGTHS, BITS = (7, 11, 12), (8, 4, 6)


def _ragged(decoder, ids, steps, slot_of) -> dict[int, torch.Tensor]:
    """Each sequence's logits, every row of every step, through `ragged_forward` with one KV slot each."""
    pool = KVPool(decoder.cfg, len(slot_of), 32)
    out: dict[int, list[torch.Tensor]] = {}
    for step in steps:
        segs, tokens, bits, rows = [], [], [], []
        for seq, a, e, decode in step:
            segs.append(Segment(slot_of[seq], a, len(tokens), e - a, decode))
            rows.append((len(tokens), len(tokens) + e - a))
            tokens += ids[seq][a:e]
            bits += [BITS[seq]] * (e - a)
        logits = ragged_forward(decoder, torch.tensor(tokens), StepPlan(tuple(segs)), pool, torch.tensor(bits), None,
                                rows)
        for (seq, *_), (a, e) in zip(step, rows):  # every row's logits, segments in order
            out.setdefault(seq, []).append(logits[a:e])
    return {s: torch.cat(v) for s, v in out.items()}


def _single_request(decoder, ids, seq) -> torch.Tensor:
    """The sequence through `MoEDecoder.forward`, in the steps' chunks (decode tokens one at a time)."""
    cache = decoder.new_cache(1, 32)
    chunks = [(a, e) for step in STEPS for s, a, e, _ in step if s == seq]
    return torch.cat([decoder.forward(torch.tensor([ids[seq][a:e]]), cache, BITS[seq])[0] for a, e in chunks])


@pytest.mark.parametrize("dense", ["source", "int8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_step_gives_each_sequence_its_single_request_logits(tiny_checkpoints, tmp_path, one_thread, family,
                                                                      dense):
    store = convert(tiny_checkpoints[family], tmp_path / "m.d2m", dense_dtype=torch.int8 if dense == "int8" else None,
                    progress=False)
    g = torch.Generator().manual_seed(FAMILIES.index(family))
    ids = [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]
    with open_model(store, EngineConfig(context=32, kv_slots=3)) as model:
        dec = model.decoder
        together = _ragged(dec, ids, STEPS, {0: 2, 1: 0, 2: 1})
        for seq in range(3):
            alone = _ragged(dec, ids, [[c for c in step if c[0] == seq] for step in STEPS if
                                       any(c[0] == seq for c in step)], {seq: 0})
            assert torch.equal(together[seq], alone[seq]), f"sequence {seq} changed in the batch"
            ref = _single_request(dec, ids, seq)
            decode = torch.tensor([d for step in STEPS for s, a, e, d in step if s == seq for _ in range(a, e)])
            assert torch.equal(together[seq][~decode], ref[~decode]), f"sequence {seq}: prefill rows differ"
            diff = (together[seq][decode] - ref[decode]).abs().max().item() if decode.any() else 0.0
            assert diff <= DECODE_ATOL[dense], f"sequence {seq}: decode rows differ by {diff:.1e}"


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "llama4"])
def test_engine_serves_family_batch_invariantly(tiny_checkpoints, tmp_path, one_thread, family):
    """The serving engine (batcher, runner, KV pool) on MLA, sinks + sliding windows, chunks + NoPE: three
    concurrent greedy requests each get the tokens and logprobs they get alone."""
    from d2moe.engine.batcher import BatcherConfig
    from d2moe.engine.engine import Engine
    from d2moe.engine.request import EngineRequest

    store = convert(tiny_checkpoints[family], tmp_path / "m.d2m", progress=False)

    def run(model, reqs):
        engine = Engine(model, BatcherConfig(3, 6, 9), 64)
        for i, r in enumerate(reqs):
            engine.add(str(i), r)
        got: dict[str, list] = {str(i): [] for i in range(len(reqs))}
        while engine.has_work():
            for o in engine.step():
                got[o.request_id] += [(t, lp.logprob) for t, lp in zip(o.token_ids, o.logprobs)]
        return got

    with open_model(store, EngineConfig(context=64, kv_slots=3)) as model:
        tok = model.tokenizer
        reqs = [EngineRequest(tuple(tok.encode(p).ids), 6, bits=b, stop_on_eos=False, logprobs=1)
                for p, b in (("Hello there", 8), ("x", 4), ("The quick brown fox", 6))]
        together = run(model, reqs)
        for i, r in enumerate(reqs):
            assert together[str(i)] == run(model, [r])["0"] and len(together[str(i)]) == 6
