"""d2moe's decode-attention kernel (quant/kernels/mwq_attention.h) against float64 attention, its batch
invariance (a sequence's result the same alone as among others), its fallbacks, and both callers: the
batched step's decode rows and the single-request decoder's one-token steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from d2moe.quant.kernels import load_kernel


def _kernel():
    kernel = load_kernel()
    q, kv = torch.zeros(1, 1, 16), torch.zeros(1, 1, 4, 16)
    if kernel is None or kernel.decode_attention(q, kv, kv, torch.zeros(1, dtype=torch.int64),
                                                 torch.ones(1, dtype=torch.int64), 1.0) is None:
        pytest.skip("no AVX-512 kernel on this machine: SDPA serves decode attention")
    return kernel


def _reference(q, keys, values, slots, lengths, scale):
    out = []
    for i in range(q.shape[0]):
        s, n = int(slots[i]), int(lengths[i])
        out.append(F.scaled_dot_product_attention(q[i][None, :, None].double(), keys[s : s + 1, :, :n].double(),
                                                  values[s : s + 1, :, :n].double(), scale=scale,
                                                  enable_gqa=True)[0, :, 0])
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads", "dk", "dv"), [(9, 3, 64, 64), (4, 4, 32, 16), (8, 1, 128, 128)])
def test_decode_attention_matches_float64_and_is_batch_invariant(heads, kv_heads, dk, dv):
    kernel = _kernel()
    g = torch.Generator().manual_seed(heads * dk)
    slots_n, max_len = 6, 300
    keys = torch.randn(slots_n, kv_heads, max_len, dk, generator=g)
    values = torch.randn(slots_n, kv_heads, max_len, dv, generator=g)
    slots = torch.tensor([4, 0, 5, 2, 1], dtype=torch.int64)
    lengths = torch.tensor([1, 17, 300, 64, 33], dtype=torch.int64)  # one position, masked tails, a full slot
    q = torch.randn(5, heads, dk, generator=g) * 3
    scale = 1 / math.sqrt(dk)
    out = kernel.decode_attention(q, keys, values, slots, lengths, scale)
    torch.testing.assert_close(out.double(), _reference(q, keys, values, slots, lengths, scale), atol=2e-6,
                               rtol=1e-5)
    for i in range(5):  # alone: the same bits
        alone = kernel.decode_attention(q[i : i + 1].contiguous(), keys, values, slots[i : i + 1], lengths[i : i + 1],
                                        scale)
        assert torch.equal(alone, out[i : i + 1])


def test_decode_attention_reads_cache_views_and_refuses_what_it_cannot():
    kernel = _kernel()
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 2, 50, 32, generator=g)
    view = cache[:, :, :20]  # a decoder's keys: a prefix of its cache (strided slots and heads)
    q = torch.randn(2, 4, 32, generator=g)
    slots, lengths = torch.arange(2), torch.full((2,), 20, dtype=torch.int64)
    out = kernel.decode_attention(q, view, view, slots, lengths, 0.2)
    torch.testing.assert_close(out.double(), _reference(q, cache, cache, slots, lengths, 0.2), atol=2e-6, rtol=1e-5)
    odd = torch.randn(1, 1, 8, 24)
    assert kernel.decode_attention(torch.randn(1, 2, 24), odd, odd, slots[:1], lengths[:1].clamp(max=8), 1.0) is None
    assert kernel.decode_attention(q, view.transpose(2, 3), view, slots, lengths, 0.2) is None  # rows not contiguous


def test_decoder_one_token_steps_use_it_and_agree_with_sdpa(tiny_checkpoints, tmp_path, monkeypatch):
    """The single-request decoder's decode steps (layers.attend, T = 1) through the kernel agree with SDPA
    (the reference it replaces) to float rounding."""
    from d2moe.convert.convert import convert
    from d2moe.engine.model import open_model
    from d2moe.models import layers

    _kernel()
    store = convert(tiny_checkpoints["mixtral"], tmp_path / "m.d2m", progress=False)
    ids = torch.tensor([[5, 17, 33, 90, 4, 61, 7, 8, 9]])

    def run() -> torch.Tensor:
        with open_model(store) as m:
            cache = m.decoder.new_cache(1, 32)
            outs = [m.decoder.forward(ids[:, :4], cache, bits=8)]
            outs += [m.decoder.forward(ids[:, t : t + 1], cache, bits=8) for t in range(4, 9)]
            return torch.cat(outs, 1)

    calls = []
    real = layers._decode_kernel
    monkeypatch.setattr(layers, "decode_rows_kernel", lambda *a: None)  # its one-call path: the test below
    monkeypatch.setattr(layers, "_decode_kernel", lambda *a: calls.append(1) or real(*a))
    fast = run()
    assert calls  # the decode steps took the kernel
    monkeypatch.setattr(layers, "_decode_kernel", lambda *a: None)
    torch.testing.assert_close(fast, run(), atol=1e-4, rtol=1e-4)


def test_one_call_decode_attention_gives_the_op_by_op_bits(tiny_checkpoints, tmp_path, monkeypatch):
    """layers.attention's one-token path (rotate, cache write and attend in one kernel call) against the same
    steps op by op: the same logits and the same cache, bit for bit, over several positions."""
    from d2moe.convert.convert import convert
    from d2moe.engine.model import open_model
    from d2moe.models import layers

    _kernel()
    store = convert(tiny_checkpoints["mixtral"], tmp_path / "m.d2m", progress=False)
    ids = torch.tensor([[5, 17, 33, 90, 4, 61, 7, 8, 9, 40, 41, 42]])

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with open_model(store) as m:
            cache = m.decoder.new_cache(1, 32)
            outs = [m.decoder.forward(ids[:, :3], cache, bits=8)]
            outs += [m.decoder.forward(ids[:, t : t + 1], cache, bits=8) for t in range(3, 12)]
            return torch.cat(outs, 1), cache.k + cache.v

    calls = []
    real = layers.decode_rows_kernel
    monkeypatch.setattr(layers, "decode_rows_kernel", lambda *a: (out := real(*a)) is not None and calls.append(1) or out)
    fast, fast_cache = run()
    assert len(calls) == 9 * 2  # every decode step, in each of the model's 2 layers
    monkeypatch.setattr(layers, "decode_rows_kernel", lambda *a: None)
    slow, slow_cache = run()
    assert torch.equal(fast, slow)
    assert all(torch.equal(a, b) for a, b in zip(fast_cache, slow_cache))
