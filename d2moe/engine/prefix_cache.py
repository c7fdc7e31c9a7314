"""Prefix caching: the keys and values of prompt chunks already prefilled, reused by later prompts that
begin with the same tokens.

Why: a chat server sees the same beginnings again and again (the template's system prompt; every earlier
turn of a conversation, sent again with each new message), and under load each prompt's prefill is what a
new request waits for. A hit copies the cached positions into the request's KV slot and prefills the rest.

Exactness: a cached chunk is reused only where prefilling it again would give the same bits, so a request's
tokens do not depend on what came before it (tests/unit/test_prefix_cache.py).
- A prompt's chunk ends are a function of its own tokens (`chunk_ends`): every multiple of the prefill
  chunk, and before tokens in `splits` (a chat template's special tokens, which start and end turns).
  So two prompts that agree up to a chunk end were cut the same way up to there.
- A chunk's key hashes the request's width policy (its bits and router-two price) and every token from the
  prompt's start to the chunk's end (`chain_keys`): a chunk's keys and values depend on all of those.
- The engine's kernels give a prefill chunk the same bits whatever shares its step (models/ragged.py).

The cache holds at most `capacity` positions (of every layer), least recently used chunks go first; the
memory plan reserves them (engine/memory.py). Models with sliding-window rings are not cached (a ring slot
does not keep its early positions).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from d2moe.models.ragged import KVPool

MIN_SPLIT_GAP = 8  # positions between a chunk end and the next one made at a split token


def chunk_ends(ids: Sequence[int], chunk: int, splits: frozenset[int] = frozenset(), gap: int = MIN_SPLIT_GAP) -> list[int]:
    """Where a prompt's prefill chunks end: at every multiple of `chunk`, before a token of `splits` that comes
    at least `gap` positions after the last end (a turn's start, not each mark of it: every chunk costs a few
    calls per layer), and at the prompt's end. Read left to right, so a prefix of the prompt is cut the same."""
    ends, last = [], 0
    for i in range(1, len(ids)):
        if i % chunk == 0 or (ids[i] in splits and i - last >= gap):
            ends.append(i)
            last = i
    ends.append(len(ids))
    return ends


def policy_key(bits: int, price: float | None) -> bytes:
    """What besides the tokens decides a prompt's keys and values: the widths its experts run at."""
    return f"bits={bits};price={'none' if price is None else price.hex()}".encode()


def chain_keys(ids: Sequence[int], ends: Sequence[int], policy: bytes) -> list[bytes]:
    """One key per chunk: a hash of the policy and of every token up to the chunk's end, chained so each
    key costs only its own chunk's tokens."""
    keys, h, start = [], hashlib.blake2b(policy, digest_size=16).digest(), 0
    for end in ends:
        h = hashlib.blake2b(h + array("q", ids[start:end]).tobytes(), digest_size=16).digest()
        keys.append(h)
        start = end
    return keys


@dataclass
class _Chunk:
    start: int
    end: int
    k: list[torch.Tensor]  # per layer [heads, end - start, k_dim]
    v: list[torch.Tensor]


@dataclass
class PrefixStats:
    hits: int = 0  # prompts that reused at least one chunk
    misses: int = 0  # prompts that could have reused and did not
    reused_tokens: int = 0  # prompt positions copied instead of computed
    stored_tokens: int = 0
    evicted_tokens: int = 0


@dataclass
class PrefixCache:
    capacity: int  # positions kept (each holds every layer's keys and values)
    chunks: OrderedDict[bytes, _Chunk] = field(default_factory=OrderedDict)  # least recently used first
    used: int = 0
    stats: PrefixStats = field(default_factory=PrefixStats)

    def match(self, keys: Sequence[bytes], ends: Sequence[int], limit: int) -> int:
        """How many leading chunks are cached and end before `limit` (a prompt keeps its last token to
        compute: it samples from that row). Counts the hit or the miss and refreshes the chunks' recency."""
        n = 0
        while n < len(keys) and ends[n] < limit and keys[n] in self.chunks:
            self.chunks.move_to_end(keys[n])
            n += 1
        if n:
            self.stats.hits += 1
            self.stats.reused_tokens += ends[n - 1]
        else:
            self.stats.misses += 1
        return n

    def restore(self, keys: Sequence[bytes], pool: KVPool, slot: int) -> int:
        """Copy the chunks of `keys` (found by `match`, in order) into `slot`; the positions filled."""
        end = 0
        for key in keys:
            c = self.chunks[key]
            for layer, (k, v) in enumerate(zip(c.k, c.v)):
                pool.k[layer][slot, :, c.start : c.end] = k
                pool.v[layer][slot, :, c.start : c.end] = v
            end = c.end
        pool.lengths[slot] = end
        return end

    def store(self, key: bytes, pool: KVPool, slot: int, start: int, end: int) -> None:
        """Keep positions start..end of `slot` (a chunk just prefilled) under `key`, evicting the least
        recently used chunks to stay within capacity. A chunk larger than the whole cache is not kept."""
        n = end - start
        if key in self.chunks:
            self.chunks.move_to_end(key)
            return
        if n > self.capacity:
            return
        while self.used + n > self.capacity:
            _, old = self.chunks.popitem(last=False)
            self.used -= old.end - old.start
            self.stats.evicted_tokens += old.end - old.start
        k = [pool.k[layer][slot, :, start:end].clone() for layer in range(len(pool.k))]
        v = [pool.v[layer][slot, :, start:end].clone() for layer in range(len(pool.v))]
        self.chunks[key] = _Chunk(start, end, k, v)
        self.used += n
        self.stats.stored_tokens += n
