"""A real-weight Mixtral (SmolLM2's FFN as every expert) converted by d2moe: 8-bit perplexity vs transformers fp32."""

from __future__ import annotations

import pytest

from d2moe.config import MWQConfig
from d2moe.convert.convert import convert
from d2moe.default_model.gguf_llama import find_smollm2_gguf
from d2moe.default_model.paths import default_texts_dir

TEXT = default_texts_dir() / "hamlet_gut.txt"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_smollm2_gguf() is None or not TEXT.is_file(), reason="run scripts/setup.sh first"),
]
MAX_TOKENS, CONTEXT = 1024, 256  # benchmarks/parity.py runs the full 8,192 tokens
PPL_REL_TOL = 0.02


def test_8bit_perplexity_matches_transformers_fp32(tmp_path):
    from benchmarks.checkpoints import build_smollm2_mixtral
    from benchmarks.parity import store_perplexity, text_ids, transformers_perplexity

    hf_dir = build_smollm2_mixtral(tmp_path / "hf", num_experts=2, top_k=1)
    ids = text_ids(hf_dir, TEXT)
    ref = transformers_perplexity(hf_dir, ids, MAX_TOKENS, CONTEXT)
    store = convert(hf_dir, tmp_path / "m.d2m", MWQConfig(method="msb"), progress=False)
    got, _ = store_perplexity(store, ids, 8, MAX_TOKENS, CONTEXT)
    assert abs(got - ref) / ref < PPL_REL_TOL, f"d2moe 8-bit {got:.3f} vs transformers fp32 {ref:.3f}"
