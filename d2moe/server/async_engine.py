"""The asyncio side of the engine thread: each request's outputs arrive on an asyncio.Queue, so handlers
await them and never block the event loop; a request whose consumer goes away (client disconnect,
timeout, cancellation) is aborted, which frees its KV slot at the next step boundary."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from d2moe.engine.loop import EngineLoop
from d2moe.engine.request import EngineRequest, RequestOutput


class QueueFull(Exception):
    pass


class AsyncEngine:
    def __init__(self, loop: EngineLoop, max_pending: int) -> None:
        self.loop = loop
        self.max_pending = max_pending  # running + waiting requests accepted at once (else QueueFull)
        self.pending = 0
        self._ids = itertools.count()

    @property
    def engine(self):
        return self.loop.engine

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def reserve(self, n: int = 1) -> None:
        """Count n requests in, or raise QueueFull (the event loop is single-threaded: no lock needed)."""
        if self.pending + n > self.max_pending:
            raise QueueFull
        self.pending += n

    def release(self, n: int = 1) -> None:
        self.pending -= n

    async def generate(self, request_id: str, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        """The request's outputs until the finished one. Leaving early (break, cancel) aborts it."""
        aloop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

        def sink(out: RequestOutput) -> None:  # engine thread
            aloop.call_soon_threadsafe(queue.put_nowait, out)

        self.loop.submit(request_id, request, sink)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.loop.abort(request_id)
