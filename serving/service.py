"""The BentoML service: an exported tailwise model behind HTTP, robust to bad input.

    bentoml serve tailwise.serving.service:TailwiseClassifier [--arg model=models/NAME]    # or: tailwise serve

The model is `--arg model=...` (a bentoml argument; `bentoml build --arg` stores it in the Bento), else
$TAILWISE_MODEL, else `serving.artifact.default_model_path()`. Everything else (classes, input size,
preprocessing, groups, logit adjustment, metrics) comes from the model's own metadata. No torch here.

APIs, all POST; images are multipart/form-data file fields named after the parameter:
    /classify        image (one file), top_k (1..number of classes, default 3) -> the top-k labels with probabilities
                     and many/medium/few groups, and the onnxruntime provider that ran
    /classify_batch  images (1..TAILWISE_MAX_BATCH_FILES files), top_k -> one record per file, in order; a file
                     that is not a readable image gets an "error" and the others are still classified
    /model_info      classes, training counts, groups, test metrics, versions, provider, limits
BentoML adds /readyz, /livez and /metrics (Prometheus; `tailwise_batch_size` counts images per model call); the
docs page at / (also /docs) and its OpenAPI spec at /docs.json are tailwise's own (no third-party scripts).

The model file is checked against its folder's manifest.json before it is loaded (serving/integrity.py; off
with TAILWISE_VERIFY=0).

Adaptive batching: each request is decoded and checked on its own, in a worker thread, and only then do its
pixels join the queue of `Batcher`, so a bad image gets its own 4xx and never fails the requests batched
with it. Every malformed request gets a 4xx with the reason: 400 for anything that is not a readable image or
a well-formed request (top_k outside 1..number of classes included), 413 for a body over
TAILWISE_MAX_UPLOAD_BYTES. Every 4xx body is {"error": "reason"} and leaves one WARNING log line with the
reason, no traceback.

Overload: at most TAILWISE_MAX_IN_FLIGHT classify requests are in the server at once (decoding, queued or in
the model); past that a request gets 503 with `Retry-After: 1` at once instead of queueing without bound.

Environment, read at import:
    TAILWISE_MODEL             model folder or .onnx file
    TAILWISE_MAX_UPLOAD_BYTES  largest request body in bytes (default 16 MiB)
    TAILWISE_MAX_PIXELS        largest image, width * height, refused before decoding (default 50 megapixels)
    TAILWISE_MAX_BATCH_FILES   most files in one /classify_batch request (default 64)
    TAILWISE_BATCHING          "0": every request runs the model on its own, without batching (default "1")
    TAILWISE_MAX_BATCH_SIZE    most images in one batched model call (default 64)
    TAILWISE_MAX_IN_FLIGHT     most classify requests in the server at once, the rest get 503 (default: MAX_BATCH_SIZE)
    TAILWISE_VERIFY            "0": load the model without checking its manifest (default "1")
    TAILWISE_ORT_THREADS       onnxruntime intra-op threads per worker (default: onnxruntime's, one per core)
    TAILWISE_ORT_SPINNING      "1": onnxruntime's idle threads busy-wait for the next call (default "0": they
                               sleep, leaving the cores to request handling)

More worker processes: BENTOML_CONFIG_OPTIONS="services.TailwiseClassifier.workers=2" (each has its own bound
of TAILWISE_MAX_IN_FLIGHT; set TAILWISE_ORT_THREADS so that workers x threads fits the cores).
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Annotated

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException, InvalidArgument
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.routing import Route

from tailwise.serving.artifact import (ImageError, OnnxClassifier, default_model_path, load_image, model_summary,
                              read_metadata, resolve_model_path)
from tailwise.serving.integrity import verify_enabled
from tailwise.serving.settings import limits
from tailwise import UserError, __version__


def model_path() -> Path:
    """The model to serve: `--arg model=...`, else $TAILWISE_MODEL, else the shipped or newest models/*/model.onnx."""
    argument = getattr(bentoml.use_arguments(), "model", None)
    if argument:
        try:
            return resolve_model_path(argument)
        except UserError as exc:
            raise UserError(f"--arg model: {exc}") from None
    return default_model_path()


_LIMITS = limits()
MAX_UPLOAD_BYTES = _LIMITS["max_upload_bytes"]
MAX_PIXELS = _LIMITS["max_pixels"]
MAX_BATCH_FILES = _LIMITS["max_batch_files"]
MAX_BATCH_SIZE = _LIMITS["max_batch_size"]
MAX_IN_FLIGHT = _LIMITS["max_in_flight"]
ORT_SPINNING = os.environ.get("TAILWISE_ORT_SPINNING", "0").strip() == "1"
ORT_THREADS = _LIMITS["ort_threads"]
BATCHING = os.environ.get("TAILWISE_BATCHING", "1").strip() != "0"
DRAIN_QUIET_S, DRAIN_MAX_S = 0.5, 5.0  # after SIGTERM, drain until no request started for 0.5 s (at most 5 s)
MODEL_PATH = model_path()  # at import, so that `bentoml build` without a model fails with the reason
MODEL_META = read_metadata(MODEL_PATH)  # verified against the manifest: a tampered model fails `bentoml build` too
NUM_CLASSES = MODEL_META["num_classes"]
CLASSIFY_PATHS = ("/classify", "/classify_batch")
OVERLOAD_LOG_EVERY_S = 10.0
log = logging.getLogger("tailwise.service")


# --------------------------------------------------------------------------------------------- batching

@functools.cache
def batch_size_histogram():
    """The `tailwise_batch_size` Prometheus histogram (created in the server's worker, where bentoml has set up
    prometheus_client's multiprocess mode)."""
    from prometheus_client import Histogram

    return Histogram("tailwise_batch_size", "Images per onnxruntime call", buckets=[2**i for i in range(11)])


class Batcher:
    """Adaptive batching: the uint8 [n, C, H, W] jobs that queue up while the model is busy run together as one
    model call of at most `max_images` images (a larger job runs alone). An idle model takes a job at once, so
    batches grow with the load and a lone request waits for nothing. One call runs at a time, in a thread."""

    def __init__(self, run, max_images: int):
        self.run, self.max_images = run, max_images
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """The model's output for `pixels`, computed in some batch."""
        if self.worker is None:  # start in the server's event loop, on first use
            self.queue = asyncio.Queue()
            self.worker = asyncio.create_task(self.work())
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((pixels, future))
        return await future

    async def work(self) -> None:
        waiting = None
        while True:
            jobs = [waiting or await self.queue.get()]
            waiting, size = None, len(jobs[0][0])
            while not self.queue.empty():
                job = self.queue.get_nowait()
                if size + len(job[0]) > self.max_images:
                    waiting = job
                    break
                jobs.append(job)
                size += len(job[0])
            jobs = [(pixels, future) for pixels, future in jobs if not future.done()]  # drop requests gone
            if not jobs:
                continue
            try:
                outputs = await anyio.to_thread.run_sync(self.run, np.concatenate([pixels for pixels, _ in jobs]))
            except Exception as exc:  # the model failed: every job in the batch gets the error, the loop goes on
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for pixels, future in jobs:
                if not future.done():
                    future.set_result(outputs[start:start + len(pixels)])
                start += len(pixels)


# --------------------------------------------------------------------------------------------- requests

class CheckedRequest(bentoml.IODescriptor):
    """Base of the request models: bentoml's own parsing, after checks that answer a malformed request with a
    400 and its reason. (BentoML 1.4 answers 500 to a multipart body without a valid boundary and to a file
    under an unknown field name, and downloads a URL sent as text in place of a file.)"""

    @classmethod
    async def from_http_request(cls, request, serde):
        expected = cls.mime_type()
        fields = ", ".join(f"{name} (file)" if name in cls.multipart_fields else name for name in cls.model_fields)
        sent = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if sent != expected:
            raise InvalidArgument(f"send {expected} (fields: {fields or 'none'}), not {sent}")
        if cls.multipart_fields:
            try:
                form = await request.form()  # cached on the request: bentoml's parser reuses it
            except (MultiPartException, HTTPException) as exc:
                reason = getattr(exc, "message", None) or getattr(exc, "detail", None) or exc
                raise InvalidArgument(f"malformed multipart/form-data body: {reason}") from None
            for name, value in form.multi_items():
                if name not in cls.model_fields:
                    raise InvalidArgument(f"unknown field {name!r}; this API takes {fields}")
                if isinstance(value, UploadFile) != (name in cls.multipart_fields):
                    kind = "a file upload" if name in cls.multipart_fields else "a plain value, not a file"
                    raise InvalidArgument(f"field {name!r} must be {kind}")
        return await super().from_http_request(request, serde)


TopK = Annotated[int, Field(ge=1, le=NUM_CLASSES, description=f"classes to return, 1 to {NUM_CLASSES} (the model's "
                                                                 "classes; the same rule as `tailwise predict`)")]


class ClassifyRequest(CheckedRequest):
    image: Path
    top_k: TopK = 3


class ClassifyBatchRequest(CheckedRequest):
    images: Annotated[list[Path], Field(min_length=1, max_length=MAX_BATCH_FILES)]
    top_k: TopK = 3


class NoArguments(CheckedRequest):
    pass


# --------------------------------------------------------------------------------------------- responses

class Prediction(BaseModel):
    label: str
    index: int
    probability: float
    group: str = Field(description="the class's training-frequency group: many, medium or few")


class Classification(BaseModel):
    predictions: list[Prediction] = Field(description="the top-k classes, most probable first")
    provider: str = Field(description="the onnxruntime execution provider that ran the model")


class FileClassification(BaseModel):
    index: int = Field(description="the file's position in the request")
    predictions: list[Prediction] = Field(description="the top-k classes, most probable first; empty on error")
    error: str | None = Field(description="why this file could not be classified, else null")


class BatchClassification(BaseModel):
    results: list[FileClassification] = Field(description="one record per uploaded file, in order")
    provider: str = Field(description="the onnxruntime execution provider that ran the model")


# --------------------------------------------------------------------------------------------- upload limit

async def send_error(send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    """An ASGI response `{"error": message}` with `status`, sent before the request reaches BentoML."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(OSError):
    """Raised into the request parser when a streamed body passes the upload limit (not logged: a 413)."""


class UploadLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, judged by its Content-Length before anything is
    read, or counted as it streams in (chunked bodies), before bentoml parses and spools it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self.refuse(send)
        received, refused = 0, False

        async def counted_receive():
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                refused = True
                raise BodyTooLarge("request body too large")  # stops the parser; its error reply is replaced below
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)
            elif message["type"] == "http.response.start":
                await self.refuse(send)

        await self.app(scope, counted_receive, guarded_send)

    async def refuse(self, send):
        await send_error(send, 413, f"request body over {self.max_bytes} bytes (TAILWISE_MAX_UPLOAD_BYTES) or without "
                                    "a valid Content-Length", [(b"connection", b"close")])


# --------------------------------------------------------------------------------------------- overload

class Overload:
    """ASGI middleware: at most `limit` requests to `paths` in this worker at once; past it, 503 with
    `Retry-After: 1` at once (the body is drained first, so that the client reads the answer)."""

    def __init__(self, app, limit: int, paths=CLASSIFY_PATHS):
        self.app, self.limit, self.paths = app, limit, frozenset(paths)
        self.active = 0
        self.refused, self.logged_at = 0, 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            return await self.refuse(receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

    async def refuse(self, receive, send):
        self.refused += 1  # one summary line per LOG_EVERY_S, not one line per refusal (see QuietClientErrors)
        now = asyncio.get_running_loop().time()
        if now - self.logged_at >= OVERLOAD_LOG_EVERY_S:
            log.warning("overloaded: %d requests refused with 503 in the last %.0f s (TAILWISE_MAX_IN_FLIGHT %d)",
                        self.refused, min(now - self.logged_at, OVERLOAD_LOG_EVERY_S), self.limit)
            self.refused, self.logged_at = 0, now
        while True:  # closing with unread data would make the kernel reset the connection, losing the 503
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        await send_error(send, 503, f"overloaded: {self.limit} requests in progress (TAILWISE_MAX_IN_FLIGHT); retry "
                                    "after 1 s", [(b"retry-after", b"1")])


# --------------------------------------------------------------------------------------------- client errors

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


class ClientErrors:
    """ASGI middleware: every 4xx body becomes {"error": "reason"} and is logged as one WARNING line with the
    reason (bentoml's own ERROR traceback and access line for it are filtered out: see QuietClientErrors).
    While the server drains for shutdown, every response carries `Connection: close`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, chunks = None, []
        Shutdown.seen_request()

        async def reshape(message):
            nonlocal start
            if message["type"] == "http.response.start" and Shutdown.draining:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
                start = message
                return
            if start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            reason = error_message(b"".join(chunks))
            body = json.dumps({"error": reason}).encode()
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length",
                                                                                        b"content-type")]
            client = scope.get("client") or ("-", 0)
            log.warning("client error %d %s %s from %s: %s", start["status"], scope.get("method"), scope.get("path"),
                        client[0], reason)
            await send({**start, "headers": headers + [(b"content-type", b"application/json"),
                                                       (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)


class QuietClientErrors(logging.Filter):
    """Drops bentoml's log records of a client error (its ERROR line with traceback, its access line): the
    ClientErrors middleware writes the one line for it; and the access lines of 503s, which Overload sums up in
    one line per OVERLOAD_LOG_EVERY_S (a flood of refusals must not flood the log, nor cost a write each)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.endswith("multipart"):  # python-multipart's own warning about a malformed body
            return record.levelno >= logging.ERROR
        if record.name == "bentoml.access":  # 4xx: ClientErrors logs it; 503: Overload logs a summary
            return not (len(record.args or ()) > 2 and str(record.args[2]).startswith(("status=4", "status=503")))
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BentoMLException):
            return exc.error_code.value >= 500
        from pydantic import ValidationError

        return not isinstance(exc, (ValidationError, BodyTooLarge))


for _name in ("bentoml.access", "bentoml._internal.server.http_app", "python_multipart.multipart",
              "multipart.multipart"):
    if not any(isinstance(f, QuietClientErrors) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(QuietClientErrors())


# --------------------------------------------------------------------------------------------- shutdown

def listening_fd() -> int | None:
    """The listening socket's descriptor that bentoml's worker was started with (`--fd N`), if any."""
    args = sys.argv
    for i, arg in enumerate(args[:-1]):
        if arg == "--fd" and args[i + 1].isdigit():
            return int(args[i + 1])
    return None


class Shutdown:
    """Graceful shutdown in the worker: on SIGTERM/SIGINT, first shut the listening socket down (new connections
    are refused at once, instead of waiting in the backlog of the socket bentoml's arbiter still holds and being
    reset later), then drain: answer every request with `Connection: close` (clients leave their keep-alive
    connections after a response, never while sending) until no request has started for DRAIN_QUIET_S (at most
    DRAIN_MAX_S), then hand over to uvicorn, which lets in-flight requests finish (--timeout-graceful-shutdown)
    and exits."""

    draining = False
    last_request = 0.0

    @classmethod
    def seen_request(cls) -> None:
        if cls.draining:
            cls.last_request = asyncio.get_running_loop().time()

    @classmethod
    def install(cls) -> None:
        fd = listening_fd()
        if fd is None or threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if not callable(previous):
                continue

            def handler(number, frame, previous=previous):
                if cls.draining:  # a second signal: no more waiting
                    log.warning("signal %d again: shutting down without the rest of the drain", number)
                    return previous(number, frame)
                cls.draining, started = True, loop.time()
                cls.last_request = started
                log.warning("signal %d: refusing new connections, answering with Connection: close until no request "
                            "starts for %g s (at most %g s), then finishing in-flight requests and exiting", number,
                            DRAIN_QUIET_S, DRAIN_MAX_S)
                try:
                    with socket.socket(fileno=os.dup(fd)) as listener:
                        listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

                def check():
                    now = loop.time()
                    if now - cls.last_request >= DRAIN_QUIET_S or now - started >= DRAIN_MAX_S:
                        previous(number, None)
                    else:
                        loop.call_later(0.05, check)

                loop.call_soon_threadsafe(loop.call_later, 0.05, check)

            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------- service

@bentoml.service(traffic={"timeout": 60})
class TailwiseClassifier:
    """Long-tailed image classification with an exported tailwise model (onnxruntime)."""

    def __init__(self) -> None:
        self.model = OnnxClassifier(MODEL_PATH, intra_op_threads=ORT_THREADS, spinning=ORT_SPINNING)  # verified; CUDA first when this onnxruntime has it, then CPU
        self.verified = verify_enabled()
        self.provider = self.model.providers[0]
        self.batcher = Batcher(self.predict, MAX_BATCH_SIZE)
        self.decoders = anyio.CapacityLimiter(os.cpu_count() or 1)  # bounds the memory of decoding big images

    @bentoml.on_startup
    def graceful_shutdown(self) -> None:
        """Runs in the worker once uvicorn has installed its signal handlers."""
        Shutdown.install()

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Logits for uint8 [N, C, H, W], counted in the batch-size histogram."""
        batch_size_histogram().observe(len(pixels))
        return self.model.predict_arrays(pixels)

    async def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Logits for decoded images, through the batcher (or on their own with TAILWISE_BATCHING=0)."""
        if BATCHING:
            return await self.batcher(pixels)
        return await anyio.to_thread.run_sync(self.predict, pixels)

    async def decode(self, upload: Path, field: str) -> np.ndarray:
        """One uploaded file -> uint8 [C, H, W], in a worker thread; InvalidArgument (a 400) naming `field`."""
        try:
            return await anyio.to_thread.run_sync(load_image, upload.read_bytes(), self.model.meta, MAX_PIXELS,
                                                  limiter=self.decoders)
        except ImageError as exc:
            raise InvalidArgument(f"{field}: {str(exc).removeprefix('<bytes>: ')}") from None

    @bentoml.api(input_spec=ClassifyRequest)
    async def classify(self, image: Path, top_k: int = 3) -> Classification:
        """Classify one image (multipart file field `image`): its top-k classes (top_k from 1 to the number of
        classes, default 3), their probabilities (0..1) and many/medium/few groups."""
        logits = await self.logits((await self.decode(image, "image"))[None])
        return Classification(predictions=self.model.top_k(logits, top_k)[0], provider=self.provider)

    @bentoml.api(input_spec=ClassifyBatchRequest)
    async def classify_batch(self, images: list[Path], top_k: int = 3) -> BatchClassification:
        """Classify several images (multipart file fields `images`, at most TAILWISE_MAX_BATCH_FILES) in one
        request; a file that is not a readable image gets an error record and the others are still classified."""
        arrays, errors = [], []
        for i, upload in enumerate(images):
            try:
                arrays.append(await self.decode(upload, f"images[{i}]"))
                errors.append(None)
            except InvalidArgument as exc:
                errors.append(str(exc))
        tops = iter(self.model.top_k(await self.logits(np.stack(arrays)), top_k) if arrays else ())
        return BatchClassification(provider=self.provider, results=[
            FileClassification(index=i, predictions=next(tops) if error is None else [], error=error)
            for i, error in enumerate(errors)])

    @bentoml.api(input_spec=NoArguments)
    def model_info(self) -> dict:
        """The served model (its folder name), classes, training counts, groups, test metrics (fractions 0..1),
        input, versions, provider and request limits."""
        meta = self.model.meta
        return {"model": self.model.path.parent.name, "class_names": meta["class_names"],
                "num_classes": meta["num_classes"], "train_counts": meta["train_counts"], "groups": meta["groups"],
                "group_thresholds": meta["group_thresholds"], "metrics": meta["metrics"], "input": meta["input"],
                "logit_adjustment": meta["logit_adjustment"], "dataset": meta["dataset"],
                "weights_sha256": meta["weights_sha256"], "created_at": meta["created_at"],
                "exported_with": meta["tailwise_version"], "tailwise_version": __version__,
                "provider": self.provider, "providers": self.model.providers, "batching": BATCHING,
                "verified": self.verified,
                "limits": {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_pixels": MAX_PIXELS,
                           "max_batch_files": MAX_BATCH_FILES, "max_batch_size": MAX_BATCH_SIZE,
                           "max_top_k": NUM_CLASSES, "max_in_flight": MAX_IN_FLIGHT}}


# outermost first: 4xx reshaping and logging, then the in-flight bound (before any body is read), then the upload limit
TailwiseClassifier.add_asgi_middleware(ClientErrors)
TailwiseClassifier.add_asgi_middleware(Overload, limit=MAX_IN_FLIGHT)
TailwiseClassifier.add_asgi_middleware(UploadLimit, max_bytes=MAX_UPLOAD_BYTES)


# --------------------------------------------------------------------------------------------- docs page

DESCRIPTION = """Long-tailed image classification with an exported tailwise model ({model}: {summary}), run by
onnxruntime.

* `POST /classify`: one image (multipart file field `image`) and `top_k` (1 to {classes}) -> the top-k labels,
  probabilities (0..1) and each label's training-frequency group (many / medium / few).
* `POST /classify_batch`: several images (file fields `images`) -> one record per file, in order.
* `POST /model_info`: classes, training counts, groups, test metrics, versions and limits.
* `GET /readyz`, `/livez`: health; `GET /metrics`: Prometheus.

Every 4xx answer is `{{"error": "reason"}}`; an overloaded server answers 503 with `Retry-After`."""


@functools.cache
def openapi_spec() -> dict:
    """bentoml's OpenAPI spec of the service with tailwise's title, version, description and error answers."""
    spec = TailwiseClassifier.openapi_spec.asdict()
    spec["info"] = {"title": f"tailwise: {MODEL_PATH.parent.name}", "version": __version__,
                    "description": DESCRIPTION.format(model=MODEL_PATH.parent.name, classes=NUM_CLASSES,
                                                      summary=model_summary(MODEL_META))}
    spec["tags"] = [{"name": "Service APIs", "description": "Classification with the served model"},
                    {"name": "Infrastructure", "description": "Health and Prometheus metrics"}]
    error = {"application/json": {"schema": {"type": "object", "required": ["error"],
                                             "properties": {"error": {"type": "string"}}}}}
    for path in ("/classify", "/classify_batch", "/model_info"):
        responses = spec["paths"][path]["post"]["responses"]
        for status, text in (("400", "Bad request: the reason"), ("413", "Body over TAILWISE_MAX_UPLOAD_BYTES"),
                             ("503", "Overloaded: retry after Retry-After seconds")):
            if status != "503" or path in CLASSIFY_PATHS:
                responses[status] = {"description": text, "content": error}
        responses.pop("422", None)
        responses.pop("500", None)
    return spec


DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<title>{title}</title>
<link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
<script>
window.onload = function () {{
  window.ui = SwaggerUIBundle({{url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true, validatorUrl: null,
                               presets: [SwaggerUIBundle.presets.apis]}});
}};
</script>
</body>
</html>
"""


async def docs_page(request):
    return HTMLResponse(DOCS_PAGE.format(title=html.escape(f"tailwise: {MODEL_PATH.parent.name} ({__version__})")))


async def docs_json(request):
    return JSONResponse(openapi_spec())


# mounted before bentoml's own / and /docs.json, so these answer; /docs, where FastAPI users look, redirects to /
TailwiseClassifier.mount_asgi_app(Starlette(routes=[
    Route("/", docs_page), Route("/docs.json", docs_json),
    Route("/docs", lambda request: RedirectResponse(str(request.base_url)))]), path="/")
