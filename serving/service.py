"""The BentoML service: an exported tailwise model behind HTTP, robust to bad input.

    bentoml serve serving.service:TailwiseClassifier [--arg model=models/NAME]    # or: tailwise serve

The model is `--arg model=...` (a bentoml argument; `bentoml build --arg` stores it in the Bento), else
$TAILWISE_MODEL, else `serving.artifact.default_model_path()`. Everything else (classes, input size,
preprocessing, groups, logit adjustment, metrics) comes from the model's own metadata. No torch here.

APIs, all POST; images are multipart/form-data file fields named after the parameter:
    /classify        image (one file), top_k (1..MAX_TOP_K, default 3) -> the top-k labels with probabilities
                     and many/medium/few groups, and the onnxruntime provider that ran
    /classify_batch  images (1..TAILWISE_MAX_BATCH_FILES files), top_k -> one record per file, in order; a file
                     that is not a readable image gets an "error" and the others are still classified
    /model_info      classes, training counts, groups, test metrics, versions, provider, limits
BentoML adds /readyz, /livez, /metrics (Prometheus; `tailwise_batch_size` counts images per model call), the
OpenAPI UI at / (also /docs) and its spec at /docs.json.

Adaptive batching: each request is decoded and checked on its own, in a worker thread, and only then do its
pixels join the queue of `Batcher`, so a bad image gets its own 4xx and never fails the requests batched
with it. Every malformed request gets a 4xx with the reason: 400 for anything that is not a readable image or
a well-formed request, 413 for a body over TAILWISE_MAX_UPLOAD_BYTES.

Environment, read at import:
    TAILWISE_MODEL             model folder or .onnx file
    TAILWISE_MAX_UPLOAD_BYTES  largest request body in bytes (default 16 MiB)
    TAILWISE_MAX_PIXELS        largest image, width * height, refused before decoding (default 50 megapixels)
    TAILWISE_MAX_BATCH_FILES   most files in one /classify_batch request (default 64)
    TAILWISE_BATCHING          "0": every request runs the model on its own, without batching (default "1")
    TAILWISE_MAX_BATCH_SIZE    most images in one batched model call (default 64)
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from pathlib import Path
from typing import Annotated

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import RedirectResponse
from starlette.routing import Route

from tailwise.serving.artifact import ImageError, OnnxClassifier, default_model_path, load_image, resolve_model_path
from tailwise import UserError, __version__


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {text!r}") from None
    if value < 1:
        raise UserError(f"{name} must be >= 1, got {value}")
    return value


def model_path() -> Path:
    """The model to serve: `--arg model=...`, else $TAILWISE_MODEL, else the shipped or newest models/*/model.onnx."""
    argument = getattr(bentoml.use_arguments(), "model", None)
    if argument:
        try:
            return resolve_model_path(argument)
        except UserError as exc:
            raise UserError(f"--arg model: {exc}") from None
    return default_model_path()


MAX_UPLOAD_BYTES = _env_int("TAILWISE_MAX_UPLOAD_BYTES", 16 * 2**20)
MAX_PIXELS = _env_int("TAILWISE_MAX_PIXELS", 50_000_000)
MAX_BATCH_FILES = _env_int("TAILWISE_MAX_BATCH_FILES", 64)
MAX_BATCH_SIZE = _env_int("TAILWISE_MAX_BATCH_SIZE", 64)
BATCHING = os.environ.get("TAILWISE_BATCHING", "1").strip() != "0"
MAX_TOP_K = 100
MODEL_PATH = model_path()  # at import, so that `bentoml build` without a model fails with the reason


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


TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K, description="classes to return (at most the number of classes)")]


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
                raise OSError("request body too large")  # stops the parser; its error reply is replaced below
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)
            elif message["type"] == "http.response.start":
                await self.refuse(send)

        await self.app(scope, counted_receive, guarded_send)

    async def refuse(self, send):
        body = json.dumps({"error": f"request body over {self.max_bytes} bytes (TAILWISE_MAX_UPLOAD_BYTES) "
                                    "or without a valid Content-Length"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------- service

@bentoml.service(traffic={"timeout": 60})
class TailwiseClassifier:
    """Long-tailed image classification with an exported tailwise model (onnxruntime)."""

    def __init__(self) -> None:
        self.model = OnnxClassifier(MODEL_PATH)  # CUDA first when this onnxruntime has it, then CPU
        self.provider = self.model.providers[0]
        self.batcher = Batcher(self.predict, MAX_BATCH_SIZE)
        self.decoders = anyio.CapacityLimiter(os.cpu_count() or 1)  # bounds the memory of decoding big images

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
        """Classify one image (multipart file field `image`): its top-k classes, probabilities and groups."""
        logits = await self.logits((await self.decode(image, "image"))[None])
        return Classification(predictions=self.model.top_k(logits, top_k)[0], provider=self.provider)

    @bentoml.api(input_spec=ClassifyBatchRequest)
    async def classify_batch(self, images: list[Path], top_k: int = 3) -> BatchClassification:
        """Classify several images (multipart file fields `images`) in one request; a file that is not a
        readable image gets an error record and the others are still classified."""
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
        """The served model (its folder name), classes, training counts, groups, test metrics, input, versions,
        provider and request limits."""
        meta = self.model.meta
        return {"model": self.model.path.parent.name, "class_names": meta["class_names"],
                "num_classes": meta["num_classes"], "train_counts": meta["train_counts"], "groups": meta["groups"],
                "group_thresholds": meta["group_thresholds"], "metrics": meta["metrics"], "input": meta["input"],
                "logit_adjustment": meta["logit_adjustment"], "dataset": meta["dataset"],
                "weights_sha256": meta["weights_sha256"], "created_at": meta["created_at"],
                "exported_with": meta["tailwise_version"], "tailwise_version": __version__,
                "provider": self.provider, "providers": self.model.providers, "batching": BATCHING,
                "limits": {"max_upload_bytes": MAX_UPLOAD_BYTES, "max_pixels": MAX_PIXELS,
                           "max_batch_files": MAX_BATCH_FILES, "max_batch_size": MAX_BATCH_SIZE,
                           "max_top_k": MAX_TOP_K}}


TailwiseClassifier.add_asgi_middleware(UploadLimit, max_bytes=MAX_UPLOAD_BYTES)
# bentoml serves the OpenAPI UI at / (spec: /docs.json); /docs, where FastAPI users look, redirects there
TailwiseClassifier.mount_asgi_app(Starlette(routes=[Route("/docs", lambda request: RedirectResponse(
    str(request.base_url)))]), path="/")
