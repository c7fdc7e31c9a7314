"""Prefill + decode loop for one request. A request carries its own width and sampling choices."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from d2moe.engine.model import LoadedModel
from d2moe.engine.sampling import SamplingParams, sample
from d2moe.engine.threads import governed, governor_for


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    bits: int = 8  # the width, or with a price the widest router two may pick
    price: float | None = None  # router-two byte price (a tier, see routing/tiers.py); None: fixed width
    deadline: float | None = None  # seconds per decode step; late high planes are then skipped (degraded)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = "length"

    @property
    def decode_tokens_per_second(self) -> float:
        # the first token comes out of prefill; decode steps produce the rest
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@contextmanager
def step_deadline(provider, deadline: float | None) -> Iterator[None]:
    """One decode step under a deadline `deadline` seconds from now (providers that degrade late planes;
    others and None: no deadline)."""
    if deadline is None or not hasattr(provider, "set_deadline"):
        yield
        return
    provider.set_deadline(time.perf_counter() + deadline)
    try:
        yield
    finally:
        provider.set_deadline(None)


def generate(model: LoadedModel, request: Request, stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield generated token ids until max_tokens or an end-of-sequence token."""
    stats = stats if stats is not None else GenerationStats()
    params = request.sampling
    if not request.prompt_ids:
        raise ValueError("the prompt is empty")
    model.provider.check_budget(request.bits)
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    threads = governor_for(model.engine)  # --threads auto, else None
    cache = model.decoder.new_cache(1, len(request.prompt_ids) + params.max_tokens)
    if len(request.prompt_ids) + params.max_tokens > cache.max_len:
        raise ValueError(f"prompt + max_tokens exceeds the model's context ({cache.max_len})")
    stats.prompt_tokens = len(request.prompt_ids)
    t0 = time.perf_counter()
    with governed(threads, len(request.prompt_ids)):
        logits = model.decoder.forward(torch.tensor([request.prompt_ids]), cache, request.bits, last_only=True,
                                       price=request.price)
    stats.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(params.max_tokens):
        token = sample(logits[0, -1], params, gen)
        if params.stop_on_eos and token in model.eos_ids:
            stats.finish_reason = "stop"
            break
        stats.generated_tokens += 1
        yield token
        if i + 1 == params.max_tokens:
            break
        with step_deadline(model.provider, request.deadline), governed(threads, 1):
            logits = model.decoder.forward(torch.tensor([[token]]), cache, request.bits, last_only=True,
                                           price=request.price)
        stats.decode_seconds = time.perf_counter() - t0
