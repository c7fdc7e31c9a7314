"""One forward step for a `Batch`: rows laid out for models/ragged.py, then each sequence samples with its
own sampling choices and generator; logprobs when asked."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from d2moe.engine.batcher import Batch, Sequence
from d2moe.engine.request import TokenLogprob, TokenStats
from d2moe.engine.sampling import SamplingParams, sample
from d2moe.models.decoder import MoEDecoder
from d2moe.models.ragged import KVPool, Segment, StepPlan, ragged_forward

MAX_TOP_LOGPROBS = 20


@dataclass
class StepResult:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # of the sampled token
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # rows of this step's chunk
    token_stats: dict[str, TokenStats] = field(default_factory=dict)  # of the row that sampled the token


def _top(logp: torch.Tensor, n: int) -> tuple[tuple[int, float], ...]:
    if n <= 0:
        return ()
    vals, idx = logp.topk(min(n, MAX_TOP_LOGPROBS, logp.numel()))
    return tuple(zip(idx.tolist(), vals.tolist()))


class Runner:
    def __init__(self, decoder: MoEDecoder, pool: KVPool, padded_attention: bool = False,
                 expert_bytes: dict[int, int] | None = None) -> None:
        self.decoder, self.pool = decoder, pool
        table = torch.zeros(16, dtype=torch.float64)  # bytes of one expert at each width (token_stats)
        for b, n in (expert_bytes or {}).items():
            table[b] = n
        self.width_bytes = table
        self.padded_attention = padded_attention
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, seq_id: str) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq: Sequence) -> torch.Generator:
        g = self._generators.get(seq.id)
        if g is None:
            g = torch.Generator()
            if seq.request.seed is not None:
                g.manual_seed(seq.request.seed)
            else:
                g.seed()
            self._generators[seq.id] = g
        return g

    def step(self, batch: Batch, seqs: dict[str, Sequence]) -> StepResult:
        segments, rows, tokens, bits, price = [], [], [], [], []
        any_price = any(seqs[c.seq_id].request.price is not None for c in batch.chunks)
        for c in batch.chunks:
            r = seqs[c.seq_id].request
            row = len(tokens)
            segments.append(Segment(c.slot, c.start, row, len(c.tokens), c.decode))
            tokens.extend(c.tokens)
            bits.extend([r.bits] * len(c.tokens))
            price.extend([float("nan") if r.price is None else r.price] * len(c.tokens))
            if c.all_logits:
                rows.append((row, row + len(c.tokens)))
            elif c.sample:
                rows.append((row + len(c.tokens) - 1, row + len(c.tokens)))
            else:
                rows.append((row, row))
        plan = StepPlan(tuple(segments))
        want_stats = any(seqs[c.seq_id].request.token_stats for c in batch.chunks)
        row_hist = torch.zeros(len(tokens), 16, dtype=torch.int64) if want_stats else None
        logits = ragged_forward(
            self.decoder, torch.tensor(tokens), plan, self.pool, torch.tensor(bits),
            torch.tensor(price) if any_price else None, rows, self.padded_attention, row_hist,
        )
        out = StepResult()
        at = 0
        for c, (a, e) in zip(batch.chunks, rows):
            seq, n = seqs[c.seq_id], e - a
            lg = logits[at : at + n]
            at += n
            r = seq.request
            if c.all_logits:  # row i predicts token start + i + 1 of the prompt
                logp = torch.log_softmax(lg.float(), dim=-1)
                nxt = list(c.tokens[1:])
                if c.start + len(c.tokens) < seq.prompt_len:
                    nxt.append(r.prompt_ids[c.start + len(c.tokens)])
                entries = [TokenLogprob(r.prompt_ids[0], None)] if c.start == 0 else []
                for i, t in enumerate(nxt):
                    entries.append(TokenLogprob(t, float(logp[i, t]), _top(logp[i], r.logprobs or 0)))
                out.prompt_logprobs.setdefault(seq.id, []).extend(entries)  # chunks in order
            if not c.sample or r.max_tokens == 0:
                continue
            last = lg[-1]
            params = SamplingParams(max(r.max_tokens, 1), r.temperature, r.top_p, r.seed, r.stop_on_eos)
            token = sample(last, params, self._generator(seq) if r.temperature > 0 else None)
            out.sampled[seq.id] = token
            if r.token_stats and row_hist is not None:
                counts = row_hist[e - 1].double()
                counts[0] = 0  # skipped experts
                n = float(counts.sum())
                avg = float((counts * torch.arange(16)).sum()) / n if n else 0.0
                out.token_stats[seq.id] = TokenStats(avg, int((counts * self.width_bytes).sum()))
            if r.logprobs is not None:
                logp = torch.log_softmax(last.float(), dim=-1)
                out.logprobs[seq.id] = TokenLogprob(token, float(logp[token]), _top(logp, r.logprobs))
        return out
