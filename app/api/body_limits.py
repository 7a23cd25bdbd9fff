"""Request-body limits applied in front of the routing, as plain ASGI middleware.

- Size: every body except the streamed uploads (which enforce their own, larger caps while streaming) is capped
  at MAX_JSON_BODY_BYTES. A declared Content-Length above the cap is answered 413 before a single body byte is
  read -- before FastAPI parses JSON and before authentication, which FastAPI runs only after the body; a chunked
  body is counted as it arrives and cut at the cap. The connection is closed after the answer (the unread rest of
  the body is not drained).
- Time: a body that stalls longer than BODY_READ_TIMEOUT between chunks ends with 408 (slow-body clients cannot
  hold a connection and a threadpool slot forever). Slow headers are the reverse proxy's job (deploy/nginx.conf).
"""

from __future__ import annotations

import json
import math

import anyio
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAYLOAD_TOO_LARGE = "payload_too_large"
REQUEST_TIMEOUT = "request_timeout"

# Routes that stream their body themselves (multipart uploads of models and datasets).
STREAMED_UPLOADS = frozenset({("POST", "/v1/models"), ("POST", "/v1/datasets"), ("POST", "/v1/probes")})
# The upload benchmark's ceiling (NBA_BENCH_ENDPOINTS=1 only): reads a body as big as an upload and discards it.
BENCH_SINK = ("POST", "/v1/_bench/sink")


class _BodyRefused(HTTPException):
    """An HTTPException, so FastAPI's body reader re-raises it (it turns other errors into a generic 400) and the
    error handlers format it; the middleware answers itself if it escapes before a response started."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(status, message, headers={"Connection": "close"})
        self.status, self.code, self.message = status, code, message


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, read_timeout: float,
                 streamed: frozenset[tuple[str, str]] = STREAMED_UPLOADS):
        self.app = app
        self.streamed = streamed
        self.max_body_bytes = max_body_bytes
        self.read_timeout = read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        streamed = (scope["method"], scope["path"].rstrip("/")) in self.streamed
        cap = math.inf if streamed else self.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "bad_request", "invalid Content-Length")
                    return
                if declared > cap:
                    await _send_error(send, 413, PAYLOAD_TOO_LARGE,
                                      f"request body of {declared} bytes exceeds the limit of {cap} bytes")
                    return
        received = 0
        started = False
        body_done = False
        timeout = self.read_timeout

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no timeout there
                return await receive()
            with anyio.move_on_after(timeout) as scope_:
                message = await receive()
            if scope_.cancelled_caught:
                raise _BodyRefused(408, REQUEST_TIMEOUT, f"no request body data for {timeout:g} s")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise _BodyRefused(413, PAYLOAD_TOO_LARGE, f"request body exceeds the limit of {cap} bytes")
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyRefused as e:
            if not started:
                await _send_error(send, e.status, e.code, e.message)
