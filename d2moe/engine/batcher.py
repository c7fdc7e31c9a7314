"""Continuous batching: which sequences run in the next step, and how far.

Contract (vLLM-like, small): `add` queues a sequence, `schedule()` returns the next `Batch`, the runner
runs it, `update` appends the sampled tokens and finishes sequences, `abort` drops one at any time. A
sequence holds a KV slot from admission to its end; new sequences are admitted between steps whenever a
slot is free. A step runs one token of every decoding sequence plus prompt chunks: a long prompt is
prefilled in chunks within a step's token budget, so it cannot starve the others' decoding. Chunk
boundaries are a function of the prompt alone (multiples of `prefill_chunk` from its start, and before each
token of `split_tokens`: engine/prefix_cache.py `chunk_ends`), which keeps a sequence's computation the same
whatever it is batched with (models/ragged.py) and lets a prefix cache hand over whole chunks.

(Not "scheduler": in d2moe that word means HEBF I/O ordering.)
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field

from d2moe.engine.prefix_cache import PrefixCache, chain_keys, chunk_ends, policy_key
from d2moe.engine.request import EngineRequest
from d2moe.models.ragged import KVPool


@dataclass(frozen=True)
class BatcherConfig:
    max_batch: int = 8  # sequences running at once (= KV slots)
    prefill_chunk: int = 128  # prompt tokens per chunk
    max_step_tokens: int = 256  # rows per step: decode tokens + prompt chunks (at least one chunk runs)
    split_tokens: frozenset[int] = frozenset()  # a chunk also ends before each of these (chat turn marks)
    multi_chunk: bool = True  # several chunks of one prompt in a step (not with sliding-window rings)

    def __post_init__(self) -> None:
        if min(self.max_batch, self.prefill_chunk, self.max_step_tokens) < 1:
            raise ValueError("max_batch, prefill_chunk and max_step_tokens must be at least 1")


@dataclass
class Sequence:
    id: str
    request: EngineRequest
    slot: int | None = None
    computed: int = 0  # tokens in the KV slot
    output: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    ends: list[int] = field(default_factory=list)  # where the prompt's prefill chunks end
    keys: list[bytes] | None = None  # each chunk's prefix-cache key (None: not cached)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.prompt_len


@dataclass(frozen=True)
class Chunk:
    """The rows of one sequence in a step."""

    seq_id: str
    slot: int
    start: int  # position of the first token
    tokens: tuple[int, ...]
    decode: bool
    sample: bool  # the last row's logits pick the next token (a decode token, or a prompt's last chunk)
    all_logits: bool  # every row's logits are reported (prompt logprobs)
    cache_key: bytes | None = None  # the prefix cache keeps this chunk's keys and values under it


@dataclass(frozen=True)
class Batch:
    chunks: tuple[Chunk, ...]  # decode chunks first, then prompt chunks

    @property
    def tokens(self) -> int:
        return sum(len(c.tokens) for c in self.chunks)


class Batcher:
    def __init__(self, config: BatcherConfig, pool: KVPool, prefix: PrefixCache | None = None) -> None:
        self.config, self.pool, self.prefix = config, pool, prefix
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}  # admitted, in admission order

    def add(self, seq: Sequence) -> None:
        r = seq.request
        if seq.id in self.running or any(s.id == seq.id for s in self.waiting):
            raise ValueError(f"request {seq.id!r} is already queued")
        if len(r.prompt_ids) + r.max_tokens > self.pool.max_len:
            raise ValueError(f"prompt ({len(r.prompt_ids)} tokens) + max_tokens ({r.max_tokens}) exceeds the "
                             f"context ({self.pool.max_len} tokens)")
        seq.ends = chunk_ends(r.prompt_ids, self.config.prefill_chunk, self.config.split_tokens)
        if self.prefix is not None and not r.prompt_logprobs:  # scoring needs every prompt row's logits
            seq.keys = chain_keys(r.prompt_ids, seq.ends, policy_key(r.bits, r.price))
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and self.pool.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.pool.allocate()
            self.running[seq.id] = seq
            if self.prefix is not None and seq.keys:
                n = self.prefix.match(seq.keys, seq.ends, seq.prompt_len)
                if n:
                    seq.computed = self.prefix.restore(seq.keys[:n], self.pool, seq.slot)

    def schedule(self) -> Batch | None:
        """The next step's chunks, or None when there is nothing to run."""
        self._admit()
        decode, prefill = [], []
        budget = self.config.max_step_tokens
        for seq in self.running.values():
            if not seq.prefilling:
                decode.append(Chunk(seq.id, seq.slot, seq.computed, (seq.output[-1],), True, True,
                                    False))
        budget -= len(decode)
        full = False
        for seq in self.running.values():
            if not seq.prefilling:
                continue
            r, pos = seq.request, seq.computed
            for i in range(bisect_right(seq.ends, pos), len(seq.ends)):
                end = seq.ends[i]
                if prefill and end - pos > budget:
                    full = True  # first come, first prefilled; at least one chunk per step
                    break
                prefill.append(Chunk(seq.id, seq.slot, pos, tuple(r.prompt_ids[pos:end]), False,
                                     end == seq.prompt_len, r.prompt_logprobs,
                                     None if seq.keys is None else seq.keys[i]))
                budget -= end - pos
                pos = end
                if not self.config.multi_chunk:
                    break
            if full:
                break
        chunks = tuple(decode + prefill)
        return Batch(chunks) if chunks else None

    def update(self, batch: Batch, sampled: dict[str, int], eos_ids: frozenset[int] = frozenset()) -> list[Sequence]:
        """Advance every chunk's sequence, append its sampled token (if any) and return the sequences that
        finished this step (their slots are freed)."""
        done = []
        for c in batch.chunks:
            seq = self.running.get(c.seq_id)
            if seq is None:  # aborted while the step ran
                continue
            seq.computed = c.start + len(c.tokens)
            if seq.prefilling:
                continue
            r = seq.request
            token = sampled.get(seq.id)
            if r.max_tokens == 0 or token is None:
                self.finish(seq.id, "length")
            elif r.stop_on_eos and token in eos_ids:
                self.finish(seq.id, "stop")
            else:
                seq.output.append(token)
                if len(seq.output) >= r.max_tokens:
                    self.finish(seq.id, "length")
            if seq.finished:
                done.append(seq)
        return done

    def finish(self, seq_id: str, reason: str) -> Sequence | None:
        """End a sequence now (a stop string, a client gone, a timeout): frees its slot. Idempotent."""
        seq = self.running.pop(seq_id, None)
        if seq is None:
            for s in self.waiting:
                if s.id == seq_id:
                    seq = s
                    self.waiting.remove(s)
                    break
        if seq is None:
            return None
        if seq.slot is not None:
            self.pool.release(seq.slot)
            seq.slot = None
        seq.finished, seq.finish_reason = True, reason
        return seq

    def abort(self, seq_id: str) -> Sequence | None:
        return self.finish(seq_id, "abort")
