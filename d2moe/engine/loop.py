"""The engine thread: the only thread that touches the model. Others talk to it through an inbox (add,
abort) and receive each request's outputs through the callback they registered, called on this thread
(the server hops them onto its event loop; the chat puts them on a queue)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from d2moe.engine.engine import Engine
from d2moe.engine.request import EngineRequest, RequestOutput

log = logging.getLogger(__name__)
Sink = Callable[[RequestOutput], None]
IDLE_WAIT = 0.5  # seconds the idle thread sleeps on its inbox between checks for shutdown


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="d2moe-engine", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def submit(self, request_id: str, request: EngineRequest, sink: Sink) -> None:
        """Queue a request; `sink` gets its outputs (the last one has finished=True), on the engine thread."""
        self._inbox.put(("add", request_id, request, sink))

    def abort(self, request_id: str) -> None:
        """Drop a request at the next step boundary (a client gone, a timeout); frees its slot."""
        self._inbox.put(("abort", request_id, None, None))

    def close(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", "", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def __enter__(self) -> EngineLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
        if sink is None:
            return
        try:
            sink(out)
        except Exception:  # a consumer's bug must not stop the engine
            log.exception("output callback failed for request %s", out.request_id)

    def _command(self, cmd: tuple) -> None:
        kind, rid, request, sink = cmd
        if kind == "add":
            self._sinks[rid] = sink
            try:
                self.engine.add(rid, request)
            except ValueError as e:
                self._deliver(RequestOutput(rid, finished=True, finish_reason="error", error=str(e)))
        elif kind == "abort":
            out = self.engine.abort(rid)
            if out is not None:
                self._deliver(out)
            self._sinks.pop(rid, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                block = not self.engine.has_work()
                while True:
                    self._command(self._inbox.get(timeout=IDLE_WAIT) if block else self._inbox.get_nowait())
                    block = False
            except queue.Empty:
                pass
            if self._stop.is_set() or not self.engine.has_work():
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # a failed step (e.g. a store read error) fails its requests, not the server
                log.exception("engine step failed")
                msg = f"{type(e).__name__}: {e}"
                for rid in list(self._sinks):
                    out = self.engine.abort(rid, "error") or RequestOutput(rid, finished=True, finish_reason="error")
                    out.error = msg
                    self._deliver(out)
                continue
            for out in outs:
                self._deliver(out)
        for rid in list(self._sinks):  # shutting down: nobody waits forever
            self._deliver(RequestOutput(rid, finished=True, finish_reason="abort", error="the server is shutting down"))
