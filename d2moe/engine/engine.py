"""The serving engine: batcher + runner + detokenization over one opened model. Synchronous and owned by
one thread (engine/loop.py runs it for the server and the chat); `step()` advances every running request
by one step and reports what each one gained."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace

from d2moe.engine.batcher import Batcher, BatcherConfig, Sequence
from d2moe.engine.detok import Detokenizer
from d2moe.engine.model import LoadedModel
from d2moe.engine.prefix_cache import PrefixCache
from d2moe.engine.request import EngineRequest, RequestOutput
from d2moe.engine.runner import Runner
from d2moe.engine.threads import governed, governor_for
from d2moe.models.kv_window import has_windows
from d2moe.models.ragged import KVPool


@dataclass
class EngineStats:
    """Counters for /metrics (written by the engine thread; plain ints, read as a snapshot)."""

    requests_finished: Counter = field(default_factory=Counter)  # finish reason -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    step_seconds: float = 0.0
    last_batch_size: int = 0
    recent: list[tuple[float, int]] = field(default_factory=list)  # (time, tokens generated) of recent steps

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        pts = [(t, n) for t, n in self.recent if now - t <= window]
        if not pts:
            return 0.0
        span = max(now - pts[0][0], 1e-3)
        return sum(n for _, n in pts) / span


def special_tokens(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special added tokens (a chat template's turn marks, end of text)."""
    return frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


class Engine:
    def __init__(self, model: LoadedModel, config: BatcherConfig, context: int,
                 padded_attention: bool = False) -> None:
        self.model = model
        self.governor = governor_for(model.engine)  # --threads auto, else None
        self.tokenizer = model.require_tokenizer()
        self.context = min(context, model.config.max_position)
        self.pool = KVPool(model.config, config.max_batch, self.context)
        rings = has_windows(model.config)
        positions = 0 if rings else model.engine.prefix_cache
        self.prefix = PrefixCache(positions) if positions else None
        # chunks also end at the chat template's special tokens (turn starts and ends): prompts then share
        # whole chunks up to their first different turn. Ring layers take one chunk of a prompt per step.
        splits = frozenset() if rings else config.split_tokens | special_tokens(self.tokenizer)
        config = replace(config, split_tokens=splits, multi_chunk=config.multi_chunk and not rings)
        self.batcher = Batcher(config, self.pool, self.prefix)
        layout = model.reader.config.layout
        widths = range(2, model.reader.max_bits + 1)
        self.runner = Runner(model.decoder, self.pool, padded_attention, {b: layout.prefix_bytes(b) for b in widths})
        self.detok: dict[str, Detokenizer] = {}
        self.stats = EngineStats()

    def add(self, request_id: str, request: EngineRequest) -> None:
        """Queue a request (ValueError if it cannot fit the context)."""
        if any(t < 0 or t >= self.model.config.vocab_size for t in request.prompt_ids):
            raise ValueError("the prompt has token ids outside the vocabulary")
        self.batcher.add(Sequence(request_id, request))
        self.detok[request_id] = Detokenizer(self.tokenizer, request.stop)
        self.stats.prompt_tokens += len(request.prompt_ids)

    def abort(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        seq = self.batcher.finish(request_id, reason)
        if seq is None:
            return None
        return self._final(seq, RequestOutput(request_id))

    def has_work(self) -> bool:
        return self.batcher.has_work()

    @property
    def queue_depth(self) -> int:
        return len(self.batcher.waiting)

    @property
    def running(self) -> int:
        return len(self.batcher.running)

    def _final(self, seq: Sequence, out: RequestOutput) -> RequestOutput:
        d = self.detok.pop(seq.id, None)
        if d is not None and seq.finish_reason != "abort":
            out.text += d.flush()
        self.runner.forget(seq.id)
        out.finished, out.finish_reason = True, seq.finish_reason
        out.prompt_tokens, out.completion_tokens = seq.prompt_len, len(seq.output)
        self.stats.requests_finished[seq.finish_reason] += 1
        return out

    def step(self) -> list[RequestOutput]:
        """Run one step; the outputs of every request that gained tokens or finished."""
        batch = self.batcher.schedule()
        if batch is None:
            return []
        t0 = time.perf_counter()
        seqs = dict(self.batcher.running)
        with governed(self.governor, batch.tokens):
            result = self.runner.step(batch, seqs)
        if self.prefix is not None:
            for c in batch.chunks:
                if c.cache_key is not None:
                    self.prefix.store(c.cache_key, self.pool, c.slot, c.start, c.start + len(c.tokens))
        before = {i: len(s.output) for i, s in seqs.items()}
        done = {s.id for s in self.batcher.update(batch, result.sampled, self.model.eos_ids)}
        outs: list[RequestOutput] = []
        generated = 0
        for seq_id in dict.fromkeys(c.seq_id for c in batch.chunks):  # a prompt may run several chunks
            seq = seqs[seq_id]
            out = RequestOutput(seq.id, prompt_tokens=seq.prompt_len)
            if seq.id in result.prompt_logprobs:
                out.prompt_logprobs = result.prompt_logprobs[seq.id]
            token = result.sampled.get(seq.id)
            if token is not None and len(seq.output) > before[seq.id]:  # appended (an end-of-sequence is not)
                generated += 1
                out.token_ids.append(token)
                if seq.id in result.logprobs:
                    out.logprobs.append(result.logprobs[seq.id])
                if seq.id in result.token_stats:
                    out.token_stats.append(result.token_stats[seq.id])
                d = self.detok[seq.id]
                out.text = d.add(token)
                if d.stopped and seq.id not in done:
                    self.batcher.finish(seq.id, "stop")
                    done.add(seq.id)
            out.completion_tokens = len(seq.output)
            if seq.id in done:
                out = self._final(seq, out)
            if out.token_ids or out.finished or out.prompt_logprobs is not None:
                outs.append(out)
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - t0
        self.stats.last_batch_size = len({c.seq_id for c in batch.chunks})
        self.stats.generation_tokens += generated
        self.stats.recent.append((time.monotonic(), generated))
        if len(self.stats.recent) > 4096:
            del self.stats.recent[:2048]
        return outs
