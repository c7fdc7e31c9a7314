"""Held-out perplexity, defined so other tools can reproduce it.

The first `max_tokens` tokens of the text (no special tokens added) are cut into non-overlapping windows of
`context` tokens; every token after the first of its window is predicted; perplexity = exp(mean NLL).
A final window shorter than 2 tokens is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from d2moe.engine.generate import step_deadline

# logits_fn(window [1, C] token ids) -> logits [1, C, V]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int  # tokens read from the text
    predicted: int  # tokens scored
    windows: int


def windows(ids: list[int], max_tokens: int, context: int) -> list[list[int]]:
    if context < 2:
        raise ValueError("context must be at least 2 tokens")
    ids = ids[:max_tokens]
    out = [ids[i : i + context] for i in range(0, len(ids), context)]
    return [w for w in out if len(w) >= 2]


def perplexity(
    ids: list[int], logits_fn: LogitsFn, max_tokens: int, context: int, progress: Callable[[int], None] | None = None
) -> PerplexityResult:
    chunks = windows(ids, max_tokens, context)
    if not chunks:
        raise ValueError("the text has fewer than 2 tokens")
    total_nll, count = 0.0, 0
    for w in chunks:
        x = torch.tensor([w])
        logits = logits_fn(x)[0, :-1].float()
        total_nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += len(w) - 1
        if progress:
            progress(len(w))
    nll = total_nll / count
    return PerplexityResult(math.exp(nll), nll, sum(len(w) for w in chunks), count, len(chunks))


def stepwise_logits(model, x: torch.Tensor, cache, bits: int, price: float | None,
                    deadline: float | None = None) -> torch.Tensor:
    """logits [1, C, V] of window x [1, C] computed one token at a time through the decode path (T = 1 per
    forward, the KV cache growing), so what a decode step does (prefetch, degrading late planes under
    --no-stall or a per-step `deadline` in seconds) acts on every prediction, as in generation. When nothing
    degrades it differs from the one-forward logits only by the few-token kernels' int16 activations (0.3 %
    perplexity on the default model; tested within 2 %)."""
    outs = []
    for i in range(x.shape[1]):
        with step_deadline(model.provider, deadline):
            outs.append(model.decoder.forward(x[:, i : i + 1], cache, bits, price=price))
    return torch.cat(outs, dim=1)
