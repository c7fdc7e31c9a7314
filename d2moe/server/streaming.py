"""Engine outputs -> OpenAI bodies: whole responses, and SSE streams (`data: {chunk}` ... `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from d2moe.engine.request import EngineRequest, RequestOutput, TokenLogprob, TokenStats
from d2moe.server.async_engine import AsyncEngine
from d2moe.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse, ChatLogprobs,
    ChatTokenLogprob, CompletionChoice, CompletionLogprobs, CompletionResponse, Delta, ServerError, TopLogprob,
    Usage, error_body,
)


@dataclass
class Collected:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    token_stats: list[TokenStats] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.token_ids
        self.text += out.text
        self.logprobs += out.logprobs
        self.token_stats += out.token_stats
        if out.prompt_logprobs:
            self.prompt_logprobs += out.prompt_logprobs
        self.finish_reason = out.finish_reason or self.finish_reason
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens
        self.completion_tokens = out.completion_tokens

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)


def stats_field(stats: list[TokenStats]) -> dict:
    """d2moe's extension to a choice or chunk: per token, the mean expert width and expert bytes."""
    return {"avg_bits": [round(s.avg_bits, 3) for s in stats], "expert_bytes": [s.expert_bytes for s in stats]}


def _failure(out: RequestOutput) -> ServerError:
    return ServerError(500, f"generation failed: {out.error or out.finish_reason}", "server_error")


async def outputs(engine: AsyncEngine, rid: str, er: EngineRequest, timeout: float) -> AsyncIterator[RequestOutput]:
    """The request's outputs, raising ServerError(504) past `timeout` seconds (the request is aborted)."""
    deadline = time.monotonic() + timeout
    gen = engine.generate(rid, er)
    try:
        while True:
            try:
                out = await asyncio.wait_for(anext(gen), max(deadline - time.monotonic(), 0.0))
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise ServerError(504, f"the request took longer than {timeout:g} s and was stopped", "timeout",
                                  code="timeout") from None
            if out.finished and out.finish_reason in ("error", "abort"):
                raise _failure(out)
            yield out
            if out.finished:
                return
    finally:
        await gen.aclose()


async def collect(engine: AsyncEngine, rid: str, er: EngineRequest, timeout: float) -> Collected:
    res = Collected()
    async for out in outputs(engine, rid, er, timeout):
        res.add(out)
    return res


def sse(events: AsyncIterator[dict], engine: AsyncEngine, reserved: int) -> StreamingResponse:
    """Server-sent events. The stream holds its place in the request queue from its first byte to its end
    (however it ends); a stream that never starts (client gone before the headers) holds nothing."""

    async def body():
        engine.pending += reserved
        try:
            try:
                async for payload in events:
                    yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
            except ServerError as e:  # headers are sent: the error travels as an event
                yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            engine.release(reserved)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- completions ------------------------------------------------------------------------------------------
def _token_text(h, t: int) -> str:
    """A token's text; a token that is only part of a UTF-8 character shows as its vocabulary entry, so
    distinct tokens stay distinct keys in top_logprobs."""
    s = h.tok.decode([t], skip_special_tokens=False)
    return s if s and "\ufffd" not in s else (h.tok.id_to_token(t) or s)


def completion_logprobs(h, entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    lp = CompletionLogprobs()
    for e in entries:
        s = _token_text(h, e.token)
        lp.tokens.append(s)
        lp.token_logprobs.append(e.logprob)
        lp.top_logprobs.append(None if e.logprob is None else {_token_text(h, t): v for t, v in e.top})
        lp.text_offset.append(offset)
        offset += len(s)
    return lp


def completion_response(h, req, jobs: list, results: list[Collected]) -> dict:
    choices = []
    usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
    for i, ((ids, er, echo_text), res) in enumerate(zip(jobs, results)):
        lp = None
        if req.logprobs is not None:
            entries = (res.prompt_logprobs if req.echo else []) + res.logprobs
            lp = completion_logprobs(h, entries)
        choices.append(CompletionChoice(index=i, text=echo_text + res.text, logprobs=lp,
                                        finish_reason=res.finish_reason))
        usage.prompt_tokens += len(ids)
        usage.completion_tokens += res.completion_tokens
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    body = CompletionResponse(id=h.engine.new_id("cmpl"), created=int(time.time()), model=h.config.model_name,
                              choices=choices, usage=usage).model_dump(exclude_none=False)
    if req.d2moe_stats:
        for choice, res in zip(body["choices"], results):
            choice["d2moe"] = stats_field(res.token_stats)
    return body


async def completion_events(h, rid: str, req, ids: list[int], er: EngineRequest, echo_text: str):
    created, model = int(time.time()), h.config.model_name
    res = Collected()
    offset = 0
    sent_echo = False

    def chunk(text: str, lp, finish: str | None) -> dict:
        return CompletionResponse(id=rid, created=created, model=model, choices=[
            CompletionChoice(text=text, logprobs=lp, finish_reason=finish)]).model_dump(exclude={"usage"})

    async for out in outputs(h.engine, rid, er, h.config.request_timeout):
        res.add(out)
        text, entries = out.text, (out.prompt_logprobs or []) + list(out.logprobs)  # prompt chunks come first
        if not sent_echo:
            text, sent_echo = echo_text + text, True
        lp = None
        if req.logprobs is not None:
            lp = completion_logprobs(h, entries, offset)
            offset += sum(len(s) for s in lp.tokens)
        if text or entries or out.finished:
            body = chunk(text, lp, out.finish_reason if out.finished else None)
            if req.d2moe_stats:
                body["d2moe"] = stats_field(out.token_stats)
            yield body
    if req.include_usage:
        yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": res.usage().model_dump()}


# --- chat ---------------------------------------------------------------------------------------------------
def chat_logprobs(h, entries: list[TokenLogprob]) -> ChatLogprobs:
    content = []
    for e in entries:
        s = _token_text(h, e.token)
        tops = [TopLogprob(token=(ts := _token_text(h, t)), logprob=v, bytes=list(ts.encode())) for t, v in e.top]
        content.append(ChatTokenLogprob(token=s, logprob=e.logprob, bytes=list(s.encode()), top_logprobs=tops))
    return ChatLogprobs(content=content)


def chat_response(h, req, rid: str, er: EngineRequest, res: Collected) -> dict:
    lp = chat_logprobs(h, res.logprobs) if req.logprobs else None
    body = ChatCompletionResponse(
        id=rid, created=int(time.time()), model=h.config.model_name, usage=res.usage(),
        choices=[ChatChoice(message=AssistantMessage(content=res.text), logprobs=lp, finish_reason=res.finish_reason)],
    ).model_dump()
    if req.d2moe_stats:
        body["choices"][0]["d2moe"] = stats_field(res.token_stats)
    return body


async def chat_events(h, rid: str, req, er: EngineRequest):
    created, model = int(time.time()), h.config.model_name
    res = Collected()

    def chunk(delta: Delta, lp, finish: str | None) -> dict:
        c = ChatCompletionChunk(id=rid, created=created, model=model,
                                choices=[ChatChunkChoice(delta=delta, logprobs=lp, finish_reason=finish)])
        body = c.model_dump(exclude={"usage"})
        body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
        return body

    yield chunk(Delta(role="assistant", content=""), None, None)
    async for out in outputs(h.engine, rid, er, h.config.request_timeout):
        res.add(out)
        lp = chat_logprobs(h, out.logprobs) if req.logprobs and out.logprobs else None
        if out.text or lp is not None or out.finished or (req.d2moe_stats and out.token_stats):
            body = chunk(Delta(content=out.text or None), lp, out.finish_reason if out.finished else None)
            if req.d2moe_stats:
                body["d2moe"] = stats_field(out.token_stats)
            yield body
    if req.include_usage:
        yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "usage": res.usage().model_dump()}


__all__ = ["Collected", "collect", "sse", "completion_response", "completion_events", "chat_response",
           "chat_events", "error_body"]
