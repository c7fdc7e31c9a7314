"""Self-generated calibration text: the dense model's own answers to a fixed list of varied requests.

Calibrating the MoEfication on Shakespeare alone fits the refit to one narrow domain: held-out Hamlet
perplexity stays close to dense while general knowledge fades (" Paris" after "The capital of France is"
falls from 0.77 to ~0.1). Mixing in text the dense model wrote itself (as in data-free distillation)
keeps its general behaviour, chat format included. Generating it takes minutes on 2 cores, so it is made
once by this script and shipped as a small text file (data/selfgen.txt, ~100 KB); the build reads it.

    python -m d2moe.default_model.selfgen d2moe/default_model/data/selfgen.txt --gguf PATH

Deterministic: fixed prompts, fixed seed, nucleus sampling (T=0.8, p=0.95). The prompts deliberately avoid
the facts the build's smoke test asks about (capital cities).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from d2moe.config import ModelConfig
from d2moe.default_model import reference as ref
from d2moe.default_model.gguf_llama import read_gguf_llama

SEPARATOR = "\n<|sample|>\n"  # between samples in the data file (never produced by the tokenizer as one token)
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CHAT_PROMPTS = (
    "Explain how photosynthesis works.",
    "What causes the seasons on Earth?",
    "Give me three tips for getting better sleep.",
    "Write a short poem about the ocean.",
    "How do vaccines train the immune system?",
    "What is the difference between weather and climate?",
    "Write a Python function that checks whether a number is prime.",
    "Summarize the causes of the First World War.",
    "How does a bicycle stay upright?",
    "What is machine learning, in simple terms?",
    "Suggest a healthy breakfast for a busy morning.",
    "Why is the sky blue?",
    "Explain the rules of chess briefly.",
    "What are the main functions of the human liver?",
    "Write a polite email asking a colleague for help with a report.",
    "How do bees make honey?",
    "What is inflation and why does it matter?",
    "Describe the water cycle.",
    "How can I start learning to play the guitar?",
    "What is the Pythagorean theorem? Give an example.",
    "Tell me a short story about a robot who learns to paint.",
    "What are black holes?",
    "How do I make a simple tomato sauce?",
    "What were the main achievements of the Roman Empire?",
    "Explain what DNA is.",
    "How does the internet work?",
    "Give me advice for a job interview.",
    "What is the difference between a virus and a bacterium?",
    "Explain recursion to a beginner programmer.",
    "Why do leaves change color in autumn?",
    "What is the theory of evolution?",
    "Write a haiku about winter.",
    "How do airplanes fly?",
    "What are renewable energy sources?",
    "Explain the difference between a list and a tuple in Python.",
    "What is a balanced diet?",
    "Describe the life cycle of a butterfly.",
    "How can I manage stress at work?",
    "What is the role of the United Nations?",
    "Explain compound interest with an example.",
    "What happened during the Renaissance?",
    "How do earthquakes happen?",
    "Write a limerick about a cat.",
    "What is the purpose of a resume?",
    "How does the heart pump blood?",
    "Explain what an algorithm is.",
    "What are the benefits of reading books?",
    "How do I solve a quadratic equation?",
    "Describe a typical day in the life of a farmer.",
    "What is the greenhouse effect?",
    "How do magnets work?",
    "Give me a plan for a weekend trip to the mountains.",
    "What is democracy?",
    "Explain the difference between speed and velocity.",
    "Why is exercise important for mental health?",
    "Write a short dialogue between a teacher and a student.",
    "What is the Industrial Revolution?",
    "How does a refrigerator keep food cold?",
    "Explain what a noun, a verb and an adjective are.",
    "What should I pack for a camping trip?",
    "How do computers store information?",
    "What is the moon made of?",
    "Translate 'good morning, how are you?' into Spanish and explain it.",
    "What makes a good friend?",
)
TEXT_PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "The history of mathematics begins",
    "In this article, we will discuss",
    "The following recipe serves four people.",
    "Chapter 1\n\nThe morning was cold and grey when",
    "Scientists have recently discovered that",
    "Here is a step-by-step guide to",
    "The city was founded in the twelfth century",
    "Dear friends,\n\nI am writing to tell you",
    "Abstract\n\nWe study",
    "The main character of the novel is",
    "Climate change is one of the most",
)


def chat_prompt(user: str) -> str:
    """The GGUF's ChatML template with its default system message, ready for the assistant's answer."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )


def generate_samples(gguf_path: Path, *, samples_per_prompt: int = 2, max_new: int = 224, seed: int = 0,
                     log=lambda msg: None) -> list[str]:
    src = read_gguf_llama(Path(gguf_path))
    cfg = ModelConfig(**src.config)
    tok = src.tokenizer()
    gen = torch.Generator().manual_seed(seed)
    eos = tuple(cfg.eos_token_ids)
    texts = []
    prompts = [chat_prompt(p) for p in CHAT_PROMPTS] + list(TEXT_PROMPTS)
    for i, prompt in enumerate(prompts):
        ids = tok.encode(prompt, add_special_tokens=False).ids
        for seq in ref.sample(src.tensors, cfg, ids, max_new, samples_per_prompt, temperature=0.8, top_p=0.95,
                              generator=gen, stop_ids=eos):
            texts.append(prompt + tok.decode(seq, skip_special_tokens=False))
        log(f"{i + 1}/{len(prompts)} prompts")
    return texts


def read_samples(path: Path) -> list[str]:
    return [s for s in Path(path).read_text(encoding="utf-8").split(SEPARATOR) if s.strip()]


def default_path() -> Path:
    return Path(__file__).parent / "data" / "selfgen.txt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m d2moe.default_model.selfgen", description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--samples-per-prompt", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    texts = generate_samples(args.gguf, samples_per_prompt=args.samples_per_prompt, max_new=args.max_new,
                             seed=args.seed, log=log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(SEPARATOR.join(texts) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    log(f"wrote {len(texts)} samples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
