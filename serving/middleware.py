"""The one ASGI middleware tailwise puts in front of BentoML's request handling, and the log filter beside it.

`Guard`, per request, in this order:
  - GET /model_info is answered as POST /model_info (it reads nothing and changes nothing);
  - a POST to a path of the service's `direct_routes()` (the classify paths) is answered by the service's own
    handler here, past BentoML's per-request dispatch (request context, routing, argument handling: that cost
    the lone client half its requests/s, docs/BENCHMARKS.md); the handler parses with the API's own request
    type and runs the API's own method, so the answer and every error are the typed API's; errors are mapped
    as BentoML maps them (pydantic's ValidationError and BentoML's 4xx exceptions: that 4xx; others a 500
    with a generic message and the traceback in the log; a client that disconnects mid-upload gets no answer and
    leaves one WARNING line); with BentoML's CORS on (http.cors), through the same CORS middleware as BentoML's
    path, with BentoML's X-BentoML-Request-ID when tracing covers them. TAILWISE_DIRECT=0 sends them through
    BentoML instead;
  - while the worker drains for shutdown (serving/shutdown.py), every response carries `Connection: close`;
  - at most `max_in_flight` requests to the classify paths in the worker at once; past it, 503 with
    `Retry-After: 1` at once (the body is read first, so that the client reads the answer), summed up in one
    log line per OVERLOAD_LOG_EVERY_S instead of a line each;
  - 413 for a body over `max_upload_bytes`, judged by its Content-Length before anything is read, or counted
    as it streams in (chunked bodies) before BentoML parses it; with CORS on, Guard's own 413 and 503 carry its
    headers like every other answer;
  - every 4xx body becomes {"error": "reason"} and leaves one WARNING line with the reason, no traceback
    (BentoML's own ERROR line and traceback for it are dropped by QuietClientErrors).
"""

from __future__ import annotations

import asyncio
import json
import logging

from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.context import trace_context
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from tailwise.serving.settings import Settings
from tailwise.serving.shutdown import drain

CLASSIFY_PATHS = ("/classify", "/classify_batch")
READ_ONLY_POSTS = ("/model_info",)   # answered to GET too
OVERLOAD_LOG_EVERY_S = 10.0
JSON_HEADERS = [(b"content-type", b"application/json")]
REFUSAL = "tailwise.refusal"   # scope key of Guard's own early answer (status, reason, headers)
SERVER_ERROR = "An unexpected error has occurred, please check the server log."   # BentoML's words for a 5xx
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
        return errors_line(detail)
    return str(data.get("error") or detail or data)[:1000]


def errors_line(errors: list) -> str:
    """pydantic's error records ({"loc", "msg"}) in one line: "field: message; ...", as BentoML's answer and a
    ValidationError (validation_message) give them."""
    return "; ".join(f"{'.'.join(map(str, e.get('loc', ()))) or 'request'}: {e.get('msg', e)}"
                     if isinstance(e, dict) else str(e) for e in errors)


def validation_message(exc: ValidationError) -> str:
    """pydantic's errors in one line, as error_message() words the same errors from BentoML's answer."""
    return errors_line(exc.errors(include_context=False, include_input=False))


def log_client_error(scope, status: int, reason: str) -> None:
    log.warning("client error %d %s %s from %s: %s", status, scope.get("method"), scope.get("path"),
                client_host(scope), reason)


def kept_headers(start: dict) -> list:
    """The headers of an app's response start that Guard keeps when it rewrites the body (CORS, request ids)."""
    return [(k, v) for k, v in start.get("headers", ())
            if k.lower() not in (b"content-length", b"content-type", b"connection")]


def client_host(scope) -> str:
    return (scope.get("client") or ("-", 0))[0]


def direct_handler(request_type, method):
    """A handler for Guard's direct routes: the request parsed by the API's `request_type` (a schemas.ImageRequest),
    its arguments given to `method` (an async method of the service returning a pydantic answer), JSON bytes."""
    async def handler(request: Request) -> bytes:
        arguments = await request_type.from_http_request(request, None)
        answer = await method(**{name: getattr(arguments, name) for name in arguments.model_fields})
        return answer.model_dump_json().encode()
    return handler


def trace_headers() -> list[tuple[bytes, bytes]]:
    """The ids BentoML's dispatch puts on an API's answer when tracing covers the request: X-BentoML-Request-ID,
    and X-BentoML-Trace-ID with http.response.trace_id (ServiceAppFactory._add_response_headers)."""
    formats = BentoMLContainer.logging_formatting.get()
    headers = [(b"x-bentoml-request-id", format(trace_context.request_id, formats["span_id"]).encode())]
    if BentoMLContainer.http.response.trace_id.get() and trace_context.trace_id is not None:
        headers.append((b"x-bentoml-trace-id", format(trace_context.trace_id, formats["trace_id"]).encode()))
    return headers


def with_headers(send, headers):
    """`send` adding `headers` to the response's start."""
    async def sender(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)
    return sender


class Guard:
    """See the module docstring. Settings are read when the app is built (a server worker's start)."""

    def __init__(self, app, settings: Settings | None = None, paths=CLASSIFY_PATHS):
        settings = settings or Settings.from_env()
        self.app, self.paths = app, frozenset(paths)
        self.max_bytes, self.limit = settings.max_upload_bytes, settings.max_in_flight
        self.direct_enabled = settings.direct
        self.direct: dict = {}  # path -> the service's handler, set once the app's start-up has built the service
        self.respond = self.answer_directly  # behind BentoML's CORS middleware when that is on (watch_startup)
        self.refuse = self.refusal              # Guard's own 413 and 503: the same
        self.active = self.refused = 0
        self.logged_at = -OVERLOAD_LOG_EVERY_S

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, self.watch_startup(send))
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        drain.seen_request()
        if scope["method"] == "GET" and scope["path"] in READ_ONLY_POSTS:   # BentoML's APIs are POST only
            scope = {**scope, "method": "POST"}
        guarded = scope["path"] in self.paths
        if guarded and self.active >= self.limit and scope["method"] != "OPTIONS":   # a CORS preflight goes on
            return await self.overloaded(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            log_client_error(scope, 413, self.too_large())
            return await self.refuse({**scope, REFUSAL: (413, self.too_large(), [(b"connection", b"close")])},
                                     receive, send)
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
                if refused:  # the app's error answer replaced, its CORS headers kept
                    start = "refused"
                    return await self.client_error(scope, send, 413, self.too_large(),
                                                   [*kept_headers(message), (b"connection", b"close")])
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
                await self.client_error(scope, send, start["status"], error_message(b"".join(chunks)),
                                        kept_headers(start))

        if not guarded:
            return await self.app(scope, counted_receive, checked_send)
        direct = scope["method"] == "POST" and scope["path"] in self.direct
        self.active += 1
        try:
            if direct:
                await self.respond(scope, counted_receive, send)
            else:
                await self.app(scope, counted_receive, checked_send)
        finally:
            self.active -= 1

    def watch_startup(self, send):
        """`send` of the lifespan: when the start-up is complete, BentoML has just built this app's service
        instance (the current one), whose `direct_routes()` this Guard then answers (behind BentoML's CORS
        middleware, configured as BentoML's own, when http.cors is on: BentoML puts that one inside Guard; Guard's
        own 413 and 503 go through it too)."""
        async def watched(message):
            if message["type"] == "lifespan.startup.complete" and self.direct_enabled:
                import bentoml

                routes = getattr(bentoml.get_current_service(), "direct_routes", None)
                self.direct = routes() if routes else {}
            if message["type"] == "lifespan.startup.complete" and BentoMLContainer.http.cors.enabled.get():
                from starlette.middleware.cors import CORSMiddleware

                options = BentoMLContainer.access_control_options.get()
                self.respond = CORSMiddleware(self.answer_directly, **options)
                # and Guard's own 413 and 503: a script on another origin reads the 503's Retry-After only with
                # CORS headers on it that expose that header too
                exposed = options.get("expose_headers") or []
                exposed = [exposed] if isinstance(exposed, str) else list(exposed)
                self.refuse = CORSMiddleware(self.refusal, **{**options, "expose_headers": [*exposed, "Retry-After"]})
            await send(message)
        return watched

    async def answer_directly(self, scope, receive, send) -> None:
        """Answer one request with the service's handler for its path (Request -> JSON bytes), errors as BentoML's."""
        request = Request(scope, receive)
        if trace_context.request_id is not None:  # tracing covers this path: BentoML's request (and trace) id
            send = with_headers(send, trace_headers())
        try:
            body = await self.direct[scope["path"]](request)
        except BodyTooLarge:
            return await self.client_error(scope, send, 413, self.too_large(), [(b"connection", b"close")])
        except ClientDisconnect:  # nobody to answer, and no server error (a 500 would count as one in /metrics)
            return log.warning("client disconnected before sending its whole request: %s %s from %s",
                               scope["method"], scope["path"], client_host(scope))
        except ValidationError as exc:
            return await self.client_error(scope, send, 400, validation_message(exc))
        except BentoMLException as exc:
            if exc.error_code.value < 500:
                return await self.client_error(scope, send, exc.error_code.value, str(exc))
            log.exception("error answering %s %s", scope["method"], scope["path"])
            return await self.answer(send, exc.error_code.value, SERVER_ERROR)
        except Exception:
            log.exception("error answering %s %s", scope["method"], scope["path"])
            return await self.answer(send, 500, SERVER_ERROR)
        finally:
            await request.close()
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        if drain.draining:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def too_large(self) -> str:
        return f"request body over {self.max_bytes} bytes (TAILWISE_MAX_UPLOAD_BYTES) or without a valid Content-Length"

    async def client_error(self, scope, send, status: int, reason: str, headers=()) -> None:
        """Answer {"error": reason} with `status` and log it as one WARNING line."""
        log_client_error(scope, status, reason)
        await self.answer(send, status, reason, headers)

    async def refusal(self, scope, receive, send) -> None:
        """The ASGI app of an answer Guard gives before any app sees the request (scope[REFUSAL]: status, reason,
        headers); `self.refuse` is this app, behind BentoML's CORS middleware when CORS is on."""
        await self.answer(send, *scope[REFUSAL])

    @staticmethod
    async def answer(send, status: int, reason: str, headers=()) -> None:
        body = json.dumps({"error": reason}).encode()
        if drain.draining:
            headers = [*headers, (b"connection", b"close")]
        await send({"type": "http.response.start", "status": status,
                    "headers": [*headers, *JSON_HEADERS, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def overloaded(self, scope, receive, send) -> None:
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
        reason = f"overloaded: {self.limit} requests in progress (TAILWISE_MAX_IN_FLIGHT); retry after 1 s"
        await self.refuse({**scope, REFUSAL: (503, reason, [(b"retry-after", b"1")])}, receive, send)


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
        return not isinstance(exc, (ValidationError, BodyTooLarge))


def quiet_client_errors() -> None:
    """Install QuietClientErrors on the loggers that would report a client error (once per process)."""
    for name in ("bentoml.access", "bentoml._internal.server.http_app", "python_multipart.multipart",
                 "multipart.multipart"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, QuietClientErrors) for f in logger.filters):
            logger.addFilter(QuietClientErrors())
