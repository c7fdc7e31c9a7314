"""GGUF export of a SentencePiece-style tokenizer (Mixtral's and Llama 2's layout: BPE with byte fallback,
spaces as U+2581, a dummy space prefix) as llama.cpp's "llama" vocabulary.

tokenizer.json keeps no SentencePiece scores, only merges; export scores a piece by its first merge's rank
(`spm_scores`). The end-to-end check: llama.cpp, tokenizing the prompt itself from the GGUF, continues it
with the greedy tokens d2moe computes from transformers' tokenization of the same prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, processors

from d2moe.config import MWQConfig
from d2moe.convert.convert import convert
from d2moe.export import export
from d2moe.export.gguf_vocab import SPACE, read_vocab, spm_scores
from test_export import NEAR_TIE, _greedy, _llamacpp_output, _peer
from tiny_hf import tiny_model

PROMPT = "the cat in the hat sat on the mat"
CHARS = sorted(set(PROMPT.replace(" ", "")) | set("bdgkloqruvwxy.,"))
# merged pieces in SentencePiece's score order (best first); "▁the" is reachable two ways, and " sat" splits
# as ▁ sa t only if "sa" merges before "▁s" and "at" (left to right, or "at" first, it would be ▁s at)
PIECES = ["▁t", "he", "sa", "at", "▁the", "▁c", "in", "on", "▁h", "▁s", "▁m", "▁th", "▁cat", "▁in",
          "▁hat", "▁on", "▁mat", "an", "▁a"]
VOCAB_SIZE = 320


def _spm_tokenizer(out: Path) -> Tokenizer:
    """What transformers writes for a Llama/Mixtral SentencePiece model: <unk> <s> </s>, 256 byte pieces,
    the merged pieces, then single characters (lowest scores); merges = every split of a piece into two
    pieces, ordered by the piece's score."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for p in PIECES + [SPACE] + CHARS:
        vocab.setdefault(p, len(vocab))
    merges = [(p[:i], p[i:]) for p in PIECES for i in range(1, len(p)) if p[:i] in vocab and p[i:] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "unk_token": "<unk>", "add_bos_token": True}))
    return tok


@pytest.fixture(scope="module")
def spm_store(tmp_path_factory) -> Path:
    """Seed 10: no near-tie in the first 16 greedy steps of PROMPT (seed 4 has one at step 5)."""
    root = tmp_path_factory.mktemp("spm")
    tiny_model("mixtral", seed=10, vocab_size=VOCAB_SIZE).save_pretrained(root / "mixtral")
    _spm_tokenizer(root / "mixtral")
    return convert(root / "mixtral", root / "mixtral.d2m", MWQConfig(), progress=False)


def test_scores_follow_the_merges():
    scores = spm_scores({"a": 0, "b": 1, "ab": 2, "ba": 3, "aba": 4}, ["a b", "b a", "ab a", "a ba"])
    assert scores["ab"] > scores["ba"] > scores["aba"] > max(scores["a"], scores["b"])
    assert scores["aba"] == -2.0  # its first merge's rank, not its second's


def test_vocab_is_llamas_kind(spm_store):
    from d2moe.engine.model import open_model

    with open_model(spm_store) as m:
        v = read_vocab(spm_store, m.config)
    assert v.kind == "llama" and v.add_space_prefix and v.add_bos and (v.bos, v.eos, v.unk) == (1, 2, 0)
    assert len(v.tokens) == len(v.scores) == VOCAB_SIZE and v.tokens[3] == "<0x00>" and v.tokens[-1].startswith("[PAD")
    assert (v.types[0], v.types[1], v.types[3], v.types[300], v.types[-1]) == (2, 3, 6, 1, 5)
    merged = [v.scores[v.tokens.index(p)] for p in PIECES]
    assert merged == sorted(merged, reverse=True)  # the score order is the pieces' (merges') order


def test_gguf_carries_pieces_scores_and_prefix(spm_store, tmp_path):
    import gguf

    out = export(spm_store, tmp_path / "m.gguf", bits=4, fmt="gguf", progress=False)
    r = gguf.GGUFReader(str(out))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("tokenizer.ggml.model") == "llama" and field("tokenizer.ggml.add_space_prefix") is True
    assert field("tokenizer.ggml.tokens")[259] == "▁t" and len(field("tokenizer.ggml.scores")) == VOCAB_SIZE
    assert "tokenizer.ggml.merges" not in r.fields
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.unknown_token_id")) == (1, 0)


@pytest.mark.skipif(_peer() is None, reason="llama.cpp peer not built (python -m benchmarks.llamacpp build)")
def test_llamacpp_tokenizes_and_generates_as_d2moe(spm_store, tmp_path):
    n = 16
    out = export(spm_store, tmp_path / "m.gguf", bits=8, fmt="gguf", progress=False)
    tok = Tokenizer.from_file(str(spm_store / "tokenizer.json"))
    ids = tok.encode(PROMPT).ids
    assert ids[0] == 1 and [tok.id_to_token(i) for i in ids[1:3] + ids[6:9]] == ["▁the", "▁cat", "▁", "sa", "t"]
    ours, margins = _greedy(spm_store, ids, 8, n, eos=2)
    sure = next((i for i, m in enumerate(margins) if m < NEAR_TIE), n)
    assert sure >= 6, f"a near-tie at step {sure}: pick another seed"

    def piece_bytes(t: int) -> bytes:
        p = tok.id_to_token(t)
        if p.startswith("<0x") and len(p) == 6:
            return bytes([int(p[3:5], 16)])
        return b"" if t < 3 else p.replace(SPACE, " ").encode()

    text = b"".join(piece_bytes(t) for t in ours[:sure])
    got = _llamacpp_output([_peer().tool("llama-completion"), "-m", str(out), "-p", PROMPT, "-n", str(n), "--temp",
                            "0", "--no-warmup", "--no-display-prompt", "--ignore-eos", "-c", "256", "-t", "1"],
                           len(text))
    assert got[:len(text)] == text, (got, text)
