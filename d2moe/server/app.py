"""The OpenAI-compatible HTTP API (FastAPI). `create_app` receives the running engine; handlers validate,
tokenize and talk to the engine thread through `AsyncEngine` queues, so none of them blocks the loop.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, and a
plain chat page at GET / (static/chat.html: streaming, tier selector, tokens shaded by expert width)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from d2moe.engine.chat_template import ChatTemplate
from d2moe.engine.request import EngineRequest
from d2moe.errors import USER_ERRORS
from d2moe.server import streaming
from d2moe.server.async_engine import AsyncEngine, QueueFull
from d2moe.server.metrics import render_metrics
from d2moe.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware
from d2moe.server.protocol import ChatCompletionRequest, CompletionRequest, ServerError, error_body


@dataclass(frozen=True)
class ServerConfig:
    """How `d2moe serve` listens and admits requests (built once from the CLI)."""

    host: str = field(default="127.0.0.1", metadata={"help": "bind address (loopback unless asked)"})
    port: int = 8000
    api_key: str | None = field(default=None, metadata={"help": "require `Authorization: Bearer KEY`"})
    max_batch: int = field(default=8, metadata={"help": "requests decoded together (KV slots)"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting beyond max_batch; more get 429"})
    request_timeout: float = field(default=600.0, metadata={"help": "seconds a request may take; then 504"})
    max_body_bytes: int = field(default=4 << 20, metadata={"help": "larger request bodies get 413"})
    model_name: str = "d2moe"
    retry_after: int = field(default=1, metadata={"help": "seconds, in 429 responses"})


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "missing" and not loc:
        return "the request needs a JSON body", None
    param = ".".join(loc) or None
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{param}: {msg}" if param else msg), param


class Handlers:
    """The routes' logic over one engine and config (no module globals)."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, template: ChatTemplate | None) -> None:
        self.engine, self.config, self.template = engine, config, template
        self.model = engine.engine.model
        self.tok = engine.engine.tokenizer
        self.context = engine.engine.context

    # --- validation -------------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise ServerError(404, f"the model {name!r} does not exist; this server serves "
                                   f"{self.config.model_name!r}", param="model", code="model_not_found")

    def width(self, req) -> tuple[int, float | None]:
        try:
            if req.bits is not None and not 2 <= req.bits <= self.model.reader.max_bits:
                raise ValueError(f"bits must be within 2..{self.model.reader.max_bits}")
            choice = self.model.width_choice(req.bits, req.tier, req.avg_bits)
        except USER_ERRORS as e:
            param = "avg_bits" if req.avg_bits is not None else "tier" if req.tier else "bits"
            raise ServerError(400, str(e).replace("--avg-bits", "avg_bits"), param=param) from None
        return choice.bits, choice.price

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tok.encode(prompt, add_special_tokens=False).ids
        else:
            ids = list(prompt)
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ServerError(400, f"prompt token ids must be within 0..{vocab - 1}", param="prompt")
        if not ids:
            raise ServerError(400, "the prompt is empty", param="prompt")
        if len(ids) >= self.context:
            raise ServerError(400, f"the prompt ({len(ids)} tokens) is longer than the context ({self.context} "
                                   "tokens)", param="prompt", code="context_length_exceeded")
        return ids

    def engine_request(self, req, ids: list[int], max_tokens: int | None, logprobs: int | None,
                       prompt_logprobs: bool = False) -> EngineRequest:
        room = self.context - len(ids)
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise ServerError(400, f"max_tokens ({max_tokens}) + the prompt ({len(ids)} tokens) exceeds the "
                                   f"context ({self.context} tokens)", param="max_tokens",
                              code="context_length_exceeded")
        bits, price = self.width(req)
        temperature = 1.0 if req.temperature is None else req.temperature
        return EngineRequest(tuple(ids), max_tokens, temperature, 1.0 if req.top_p is None else req.top_p,
                             req.seed, bits, price, req.stop_list(), stop_on_eos=not req.ignore_eos,
                             logprobs=logprobs,
                             prompt_logprobs=prompt_logprobs, token_stats=req.d2moe_stats)

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if self.template is None:
            raise ServerError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                        for m in req.messages]
            text = self.template.render(messages, add_generation_prompt=True)
        except ValueError as e:
            raise ServerError(400, str(e), param="messages") from None
        return self.encode(text)

    # --- routes -----------------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, http: Request):
        self.check_model(req.model)
        prompts = req.prompts()
        if not prompts:
            raise ServerError(400, "the prompt is empty", param="prompt")
        if req.stream and len(prompts) > 1:
            raise ServerError(400, "streaming takes one prompt per request", param="prompt")
        jobs = []
        for p in prompts:
            ids = self.encode(p)
            er = self.engine_request(req, ids, req.max_tokens, req.logprobs, req.echo and req.logprobs is not None)
            echo_text = (p if isinstance(p, str) else self.tok.decode(ids)) if req.echo else ""
            jobs.append((ids, er, echo_text))
        self._reserve(len(jobs))
        if req.stream:
            self.engine.release(len(jobs))  # the stream takes its place when it starts (streaming.sse)
            rid = self.engine.new_id("cmpl")
            return streaming.sse(streaming.completion_events(self, rid, req, *jobs[0]), self.engine, 1)
        try:
            results = await self._collect_all(http, [(self.engine.new_id("cmpl"), er) for _, er, _ in jobs])
        finally:
            self.engine.release(len(jobs))
        return streaming.completion_response(self, req, jobs, results)

    async def chat(self, req: ChatCompletionRequest, http: Request):
        self.check_model(req.model)
        ids = self.chat_prompt(req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        er = self.engine_request(req, ids, req.token_limit, logprobs)
        self._reserve(1)
        rid = self.engine.new_id("chatcmpl")
        if req.stream:
            self.engine.release(1)  # the stream takes its place when it starts (streaming.sse)
            return streaming.sse(streaming.chat_events(self, rid, req, er), self.engine, 1)
        try:
            (result,) = await self._collect_all(http, [(rid, er)])
        finally:
            self.engine.release(1)
        return streaming.chat_response(self, req, rid, er, result)

    def _reserve(self, n: int) -> None:
        try:
            self.engine.reserve(n)
        except QueueFull:
            raise ServerError(429, "the server is busy: the request queue is full; retry later",
                              type_="rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(self.config.retry_after)}) from None

    async def _collect_all(self, http: Request, jobs: list[tuple[str, EngineRequest]]) -> list:
        """Run requests to the end; abort them all if the client leaves or the timeout passes."""
        tasks = [asyncio.create_task(streaming.collect(self.engine, rid, er, self.config.request_timeout))
                 for rid, er in jobs]
        try:
            while not all(t.done() for t in tasks):
                await asyncio.wait(tasks, timeout=0.25, return_when=asyncio.ALL_COMPLETED)
                if not all(t.done() for t in tasks) and await http.is_disconnected():
                    raise asyncio.CancelledError
            return [t.result() for t in tasks]
        finally:
            for t in tasks:
                t.cancel()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": 0,
                                            "owned_by": "d2moe", "max_model_len": self.context}]}


def create_app(engine: AsyncEngine, config: ServerConfig, template: ChatTemplate | None = None) -> FastAPI:
    """The API over a running engine thread (the caller starts and stops it)."""
    app = FastAPI(title="d2moe", docs_url=None, redoc_url=None, openapi_url=None)
    h = Handlers(engine, config, template)

    @app.exception_handler(ServerError)
    async def _server_error(_: Request, exc: ServerError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, message, kinds.get(exc.status_code, "invalid_request_error"),
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        return await h.completions(req, http)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, http: Request):
        return await h.chat(req, http)

    @app.get("/v1/models")
    async def models():
        return h.models()

    page = (Path(__file__).parent / "static" / "chat.html").read_text()

    @app.get("/")
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(render_metrics(engine), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    if config.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)  # added last: runs first
    return app
