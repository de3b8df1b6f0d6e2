"""The one ASGI middleware tailwise puts in front of BentoML's request handling, and the log filter beside it.

`Guard`, per request, in this order:
  - GET /model_info is answered as POST /model_info (it reads nothing and changes nothing);
  - while the worker drains for shutdown (serving/shutdown.py), every response carries `Connection: close`;
  - at most `max_in_flight` requests to the classify paths in the worker at once; past it, 503 with
    `Retry-After: 1` at once (the body is read first, so that the client reads the answer), summed up in one
    log line per OVERLOAD_LOG_EVERY_S instead of a line each;
  - 413 for a body over `max_upload_bytes`, judged by its Content-Length before anything is read, or counted
    as it streams in (chunked bodies) before BentoML parses it;
  - every 4xx body becomes {"error": "reason"} and leaves one WARNING line with the reason, no traceback
    (BentoML's own ERROR line and traceback for it are dropped by QuietClientErrors).
"""

from __future__ import annotations

import asyncio
import json
import logging

from bentoml.exceptions import BentoMLException

from tailwise.serving.settings import Settings
from tailwise.serving.shutdown import drain

CLASSIFY_PATHS = ("/classify", "/classify_batch")
READ_ONLY_POSTS = ("/model_info",)   # answered to GET too
OVERLOAD_LOG_EVERY_S = 10.0
JSON_HEADERS = [(b"content-type", b"application/json")]
log = logging.getLogger("tailwise.service")


class BodyTooLarge(OSError):
    """Raised into the request parser when a streamed body passes the upload limit (not logged: a 413)."""


def error_message(body: bytes) -> str:
    """One line from a 4xx body: bentoml's [{"error"}] or {"error", "detail": [pydantic errors]}, or plain text."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip()[:500] or "bad request"
    if isinstance(data, list) and data:
        data = data[0]
    if not isinstance(data, dict):
        return str(data)[:500]
    detail = data.get("detail")
    if isinstance(detail, list) and detail:
        return "; ".join(f"{'.'.join(map(str, d.get('loc', ()))) or 'request'}: {d.get('msg', d)}"
                         if isinstance(d, dict) else str(d) for d in detail)
    return str(data.get("error") or detail or data)[:1000]


class Guard:
    """See the module docstring. Settings are read when the app is built (a server worker's start)."""

    def __init__(self, app, settings: Settings | None = None, paths=CLASSIFY_PATHS):
        settings = settings or Settings.from_env()
        self.app, self.paths = app, frozenset(paths)
        self.max_bytes, self.limit = settings.max_upload_bytes, settings.max_in_flight
        self.active = self.refused = 0
        self.logged_at = -OVERLOAD_LOG_EVERY_S

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        drain.seen_request()
        if scope["method"] == "GET" and scope["path"] in READ_ONLY_POSTS:   # BentoML's APIs are POST only
            scope = {**scope, "method": "POST"}
        guarded = scope["path"] in self.paths
        if guarded and self.active >= self.limit:
            return await self.overloaded(receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self.client_error(scope, send, 413, self.too_large(), [(b"connection", b"close")])
        received, refused, start, chunks = 0, False, None, []

        async def counted_receive():
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                refused = True
                raise BodyTooLarge("request body too large")  # stops the parser; its error reply is replaced below
            return message

        async def checked_send(message):
            nonlocal start
            if message["type"] == "http.response.start":
                if refused:
                    start = "refused"
                    return await self.client_error(scope, send, 413, self.too_large(), [(b"connection", b"close")])
                if drain.draining:
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
                if 400 <= message["status"] < 500:
                    start = message
                    return
                return await send(message)
            if start is None:
                return await send(message)
            if start == "refused":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                headers = [(k, v) for k, v in start.get("headers", ())
                           if k.lower() not in (b"content-length", b"content-type", b"connection")]
                await self.client_error(scope, send, start["status"], error_message(b"".join(chunks)), headers)

        if not guarded:
            return await self.app(scope, counted_receive, checked_send)
        self.active += 1
        try:
            await self.app(scope, counted_receive, checked_send)
        finally:
            self.active -= 1

    def too_large(self) -> str:
        return f"request body over {self.max_bytes} bytes (TAILWISE_MAX_UPLOAD_BYTES) or without a valid Content-Length"

    async def client_error(self, scope, send, status: int, reason: str, headers=()) -> None:
        """Answer {"error": reason} with `status` and log it as one WARNING line."""
        client = scope.get("client") or ("-", 0)
        log.warning("client error %d %s %s from %s: %s", status, scope.get("method"), scope.get("path"), client[0],
                    reason)
        await self.answer(send, status, reason, headers)

    @staticmethod
    async def answer(send, status: int, reason: str, headers=()) -> None:
        body = json.dumps({"error": reason}).encode()
        if drain.draining:
            headers = [*headers, (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, *JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def overloaded(self, receive, send) -> None:
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if now - self.logged_at >= OVERLOAD_LOG_EVERY_S:
            log.warning("overloaded: %d requests refused with 503 in the last %.0f s (TAILWISE_MAX_IN_FLIGHT %d)",
                        self.refused, min(now - self.logged_at, OVERLOAD_LOG_EVERY_S), self.limit)
            self.refused, self.logged_at = 0, now
        while True:  # closing with unread data would make the kernel reset the connection, losing the 503
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        await self.answer(send, 503, f"overloaded: {self.limit} requests in progress (TAILWISE_MAX_IN_FLIGHT); retry "
                                     "after 1 s", [(b"retry-after", b"1")])


class QuietClientErrors(logging.Filter):
    """Drops bentoml's log records of a client error (its ERROR line with traceback, its access line if access
    logs are on): Guard writes the one line for it; and access lines of 503s, which Guard sums up."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.endswith("multipart"):  # python-multipart's own warning about a malformed body
            return record.levelno >= logging.ERROR
        if record.name == "bentoml.access":
            return not (len(record.args or ()) > 2 and str(record.args[2]).startswith(("status=4", "status=503")))
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BentoMLException):
            return exc.error_code.value >= 500
        from pydantic import ValidationError

        return not isinstance(exc, (ValidationError, BodyTooLarge))


def quiet_client_errors() -> None:
    """Install QuietClientErrors on the loggers that would report a client error (once per process)."""
    for name in ("bentoml.access", "bentoml._internal.server.http_app", "python_multipart.multipart",
                 "multipart.multipart"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietClientErrors) for f in logger.filters):
            logger.addFilter(QuietClientErrors())
