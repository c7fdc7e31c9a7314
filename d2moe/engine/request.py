"""What one served request asks for, and what the engine reports back per step.

Everything a request chooses travels with it: sampling, its width (a fixed width, or router two at a price:
its tier), stop conditions and what to report (logprobs, echo). The engine never changes shared modules
to serve one request differently from another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int = 16  # 0: only score the prompt (echo + logprobs)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    bits: int = 8  # the width, or with a price the widest router two may pick
    price: float | None = None  # router-two byte price (a tier); None: fixed width
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    stop_on_eos: bool = True
    logprobs: int | None = None  # report the sampled token's logprob and this many top alternatives
    prompt_logprobs: bool = False  # also the prompt's tokens' logprobs (echo + logprobs: scoring)
    token_stats: bool = False  # report each token's mean expert width and the expert bytes its widths need

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the prompt is empty")
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError("temperature must be a finite number >= 0")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None  # None: the first prompt token (nothing predicts it)
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


@dataclass(frozen=True)
class TokenStats:
    """How the step that produced a token computed it: the mean width over every expert it chose in every
    MoE layer (skipped ones not counted) and the bytes those experts need at those widths."""

    avg_bits: float
    expert_bytes: int


@dataclass
class RequestOutput:
    """One step's news for one request: the tokens and text added since the last output."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # once, when the prompt is done (prompt_logprobs)
    token_stats: list[TokenStats] = field(default_factory=list)  # per token, with `token_stats`
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
