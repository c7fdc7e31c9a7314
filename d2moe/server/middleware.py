"""ASGI middleware: bearer-key check and a request-body size cap, both answering with OpenAI error bodies
before any handler runs."""

from __future__ import annotations

import hmac
import json

from d2moe.server.protocol import error_body

OPEN_PATHS = frozenset({"/health", "/"})  # no API key: probes, and the static chat page (its calls send one)


async def _send_error(send, status: int, message: str, type_: str, code: str | None,
                      headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class ApiKeyMiddleware:
    """Every route but /health needs `Authorization: Bearer KEY` (constant-time comparison)."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                await _send_error(send, 401, "invalid or missing API key: send `Authorization: Bearer <key>`",
                                  "authentication_error", "invalid_api_key",
                                  [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes with 413, by Content-Length or (chunked uploads) by reading the body
    first: the app then gets it in one message, and later receives (disconnects) go to the client."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        message = f"request body too large (limit {self.limit} bytes)"
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(send, 413, message, "invalid_request_error", "body_too_large")
            return
        parts, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left before sending its body
                return
            parts.append(msg.get("body", b""))
            seen += len(parts[-1])
            if seen > self.limit:
                await _send_error(send, 413, message, "invalid_request_error", "body_too_large")
                return
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
