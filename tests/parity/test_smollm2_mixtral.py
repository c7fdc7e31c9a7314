"""A real-weight Mixtral (SmolLM2's FFN as every expert) converted by d2moe: 8-bit perplexity vs transformers fp32."""

from __future__ import annotations

import pytest
import torch

from d2moe.config import MWQConfig
from d2moe.convert.convert import convert
from d2moe.default_model.gguf_llama import find_smollm2_gguf
from d2moe.default_model.paths import default_texts_dir
from d2moe.engine.model import open_model
from d2moe.engine.perplexity import perplexity

TEXT = default_texts_dir() / "hamlet_gut.txt"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_smollm2_gguf() is None or not TEXT.is_file(), reason="run scripts/setup.sh first"),
]
MAX_TOKENS, CONTEXT = 1024, 256
PPL_REL_TOL = 0.02


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from benchmarks.checkpoints import build_smollm2_mixtral

    return build_smollm2_mixtral(tmp_path_factory.mktemp("smix") / "hf", num_experts=2, top_k=1)


def test_8bit_perplexity_matches_transformers_fp32(mixtral, tmp_path):
    import transformers
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(mixtral / "tokenizer.json")).encode(TEXT.read_text(), add_special_tokens=False).ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(mixtral, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = perplexity(ids, lambda x: hf(x).logits, MAX_TOKENS, CONTEXT).perplexity
    del hf
    model = open_model(convert(mixtral, tmp_path / "m.d2m", MWQConfig(method="msb"), progress=False))

    def ours(x):
        return model.decoder.forward(x, model.decoder.new_cache(1, x.shape[1]), 8)

    got = perplexity(ids, ours, MAX_TOKENS, CONTEXT).perplexity
    assert abs(got - ref) / ref < PPL_REL_TOL, f"d2moe 8-bit {got:.3f} vs transformers fp32 {ref:.3f}"
