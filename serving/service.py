"""The BentoML service: an exported tailwise model behind HTTP, robust to bad input.

    bentoml serve tailwise.serving.service:TailwiseClassifier [--arg model=models/NAME]    # or: tailwise serve

The model is `--arg model=...` (a bentoml argument; `bentoml build --arg` stores it in the Bento), else
$TAILWISE_MODEL, else the model shipped with tailwise (`tailwise.format.default_model`); it is read, and checked against its folder's
manifest.json (serving/integrity.py; off with TAILWISE_VERIFY=0), when this module is imported, so that
`bentoml build` of a missing or tampered model fails with the reason. Everything else (classes, input size,
preprocessing, groups, logit adjustment, metrics) comes from the model's own metadata. No torch here.

APIs, all POST (request parsing and answers: serving/schemas.py):
    /classify        image (a multipart file field, or the raw body with Content-Type image/png, image/jpeg ...),
                     top_k (1..number of classes, default 3) -> the top-k labels with probabilities and
                     many/medium/few groups, the conformal prediction set and `unsure` (null without sets;
                     TAILWISE_COVERAGE chooses among the model's calibrated coverages), and the provider that ran
    /classify_batch  images (1..TAILWISE_MAX_BATCH_FILES files), top_k -> one record per file, in order; a file
                     that is not a readable image gets an "error" and the others are still classified
    /model_info      classes, training counts, groups, test metrics, prediction sets and the served coverage,
                     versions, provider, limits
BentoML adds /readyz, /livez and /metrics (Prometheus; `tailwise_batch_size` counts images per model call); the
docs page at / (also /docs) and its OpenAPI spec at /docs.json are tailwise's own (serving/docs.py). The classify
paths are answered in tailwise's Guard middleware (`direct_routes`: each API's own parsing and method, past
BentoML's per-request dispatch; TAILWISE_DIRECT=0: through BentoML's).
Settings (TAILWISE_*, serving/settings.py) are read when the service is constructed, in each worker. Each
request is decoded and checked on its own (a small image on the event loop, a large one in a thread pool), and
only then do its pixels join the batcher's queue (serving/batching.py), so a bad image gets its own 400 and never
fails the requests batched with it. Every 4xx is {"error": "reason"} with one WARNING line; past
TAILWISE_MAX_IN_FLIGHT requests, 503 with Retry-After; SIGTERM drains (serving/middleware.py, shutdown.py).

Workers: one by default; a batch runs on one onnxruntime thread per core (TAILWISE_ORT_THREADS), a lone image on
one sleeping thread or on all spinning, the faster lately (TAILWISE_ORT_SPINNING), on the event loop; more workers with
BENTOML_CONFIG_OPTIONS="services.TailwiseClassifier.workers=N", each then with cores / N threads.
BentoML's access log is off and its tracing skips the classify paths (each costs more per request than the
model): turn them back on with BENTOML_CONFIG_OPTIONS (logging.access.enabled=true, tracing.excluded_urls=...).
"""

from __future__ import annotations

import functools
import gc
import os
import struct
import time
from pathlib import Path

import anyio
import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument

from tailwise import UserError, __version__
from tailwise._core import load_image
from tailwise.serving.artifact import (ImageError, OnnxClassifier, default_model_path, read_metadata,
                                       resolve_model_path)
from tailwise.serving.batching import Batcher
from tailwise.serving.docs import docs_app
from tailwise.serving.middleware import Guard, direct_handler, quiet_client_errors
from tailwise.serving.schemas import (BatchClassification, Classification, ClassifyBatchRequest, ClassifyRequest,
                                      FileClassification, NoArguments)
from tailwise.serving.sessions import lone_image_runner, threads
from tailwise.serving.settings import LOOP_MODEL_MS, Settings
from tailwise.serving.shutdown import drain


def model_path() -> Path:
    """The model to serve: `--arg model=...`, else $TAILWISE_MODEL, else the model shipped with tailwise."""
    argument = getattr(bentoml.use_arguments(), "model", None)
    if argument:
        try:
            return resolve_model_path(argument)
        except UserError as exc:
            raise UserError(f"--arg model: {exc}") from None
    return default_model_path()


MODEL_PATH = model_path()
MODEL_META = read_metadata(MODEL_PATH)  # verified against the manifest: a tampered model fails `bentoml build` too
# BentoML's access log, Prometheus metrics and tracing each cost more per request than the model: off by default
# (tracing skips the classify paths; the pattern covers /classify_batch too), back on with BENTOML_CONFIG_OPTIONS.
CONFIG = {"traffic": {"timeout": 60}, "workers": 1, "logging": {"access": {"enabled": False}},
          "metrics": {"enabled": False}, "tracing": {"excluded_urls": "/classify"}}


@functools.cache
def batch_size_histogram():
    """The `tailwise_batch_size` Prometheus histogram (created in the server's worker, where bentoml has set up
    prometheus_client's multiprocess mode)."""
    from prometheus_client import Histogram

    return Histogram("tailwise_batch_size", "Images per onnxruntime call", buckets=[2**i for i in range(11)])


def workers() -> int:
    """The worker processes of this service in bentoml's configuration ("cpu_count": one per core)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    try:
        value = BentoMLContainer.config.services["TailwiseClassifier"].workers.get()
    except Exception:
        value = 1
    return (os.cpu_count() or 1) if value == "cpu_count" else max(1, int(value or 1))


@bentoml.service(**CONFIG)
class TailwiseClassifier:
    """Long-tailed image classification with an exported tailwise model (onnxruntime)."""

    def __init__(self) -> None:
        self.settings = settings = Settings.from_env()
        threads = settings.ort_threads or max(1, (os.cpu_count() or 1) // workers())
        self.model = OnnxClassifier(MODEL_PATH, intra_op_threads=threads, verify=settings.verify,
                                    spinning=settings.ort_spinning == "1")  # CUDA first when onnxruntime has it
        self.solo = lone_image_runner(self.model, threads, settings.ort_spinning, settings.verify)  # sessions.py
        self.provider = self.model.providers[0]
        self.sets = settings.sets_level(self.model.meta["prediction_sets"])  # TAILWISE_COVERAGE; None: no sets
        self.call_s = warm_up(self.solo)  # also warms onnxruntime up: the first request pays nothing extra
        fast = self.call_s < LOOP_MODEL_MS / 1000  # "auto": a lone image on the event loop if the model is fast
        self.loop_images = {"0": 0, "1": 2**31, "auto": int(fast)}[settings.model_on_loop]
        self.batcher = Batcher(self.predict, settings.max_batch_size, self.loop_images) if settings.batching else None
        self.decoders = anyio.CapacityLimiter(os.cpu_count() or 1)  # bounds the memory of decoding big images

    @bentoml.on_startup
    def started(self) -> None:
        """Runs in the worker once uvicorn has installed its signal handlers: the SIGTERM drain, and the objects
        of the start-up (bentoml, onnx, pydantic: about a million) moved out of the garbage collector's sight, so
        that a full collection under load walks only what requests allocate."""
        drain.install()
        gc.collect()
        gc.freeze()

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Logits for uint8 [N, C, H, W], counted in the batch-size histogram."""
        batch_size_histogram().observe(len(pixels))
        return (self.solo if len(pixels) == 1 else self.model).predict_arrays(pixels)

    async def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Logits for decoded images, through the batcher (or on their own with TAILWISE_BATCHING=0)."""
        if self.batcher is not None:
            return await self.batcher(pixels)
        if len(pixels) <= self.loop_images:
            return self.predict(pixels)
        return await anyio.to_thread.run_sync(self.predict, pixels)

    async def decode(self, data: bytes, field: str) -> np.ndarray:
        """One image's bytes -> uint8 [C, H, W]: on the event loop if it is small (a thread hop costs more than
        decoding a thumbnail), else in a worker thread; InvalidArgument (a 400) naming `field`."""
        try:
            if small_image(data, self.settings.inline_pixels):
                return load_image(data, self.model.meta, self.settings.max_pixels)
            return await anyio.to_thread.run_sync(load_image, data, self.model.meta, self.settings.max_pixels,
                                                  limiter=self.decoders)
        except ImageError as exc:
            raise InvalidArgument(f"{field}: {str(exc).removeprefix('<bytes>: ')}") from None

    def answers(self, logits: np.ndarray, k: int) -> list[dict]:
        """Per row: the top-k predictions (probabilities rounded to 6 decimals), the prediction set and unsure."""
        return self.model.answers(logits, k, self.sets or "off", digits=6)

    def check_top_k(self, k: int) -> int:
        try:
            return self.model.check_top_k(k)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    @bentoml.api(input_spec=ClassifyRequest, output_spec=Classification)
    async def classify(self, image: bytes, top_k: int = 3) -> Classification:
        """Classify one image (multipart file field `image`, or the raw body with its image Content-Type and
        ?top_k=): its top-k classes (top_k from 1 to the number of classes, default 3), their probabilities (0..1)
        and many/medium/few groups."""
        return await self.classify_one(image, top_k)

    @bentoml.api(input_spec=ClassifyBatchRequest, output_spec=BatchClassification)
    async def classify_batch(self, images: list[bytes], top_k: int = 3) -> BatchClassification:
        """Classify several images (multipart file fields `images`, at most TAILWISE_MAX_BATCH_FILES) in one
        request; a file that is not a readable image gets an error record and the others are still classified."""
        return await self.classify_many(images, top_k)

    def direct_routes(self) -> dict:
        """The paths the Guard middleware answers itself (serving/middleware.py), each parsed by its API's request
        type and answered by the same method as the API: BentoML's per-request dispatch skipped."""
        return {"/classify": direct_handler(ClassifyRequest, self.classify_one),
                "/classify_batch": direct_handler(ClassifyBatchRequest, self.classify_many)}

    async def classify_one(self, image: bytes, top_k: int) -> Classification:
        k = self.check_top_k(top_k)
        logits = await self.logits((await self.decode(image, "image"))[None])
        return Classification(**self.answers(logits, k)[0], provider=self.provider)

    async def classify_many(self, images: list[bytes], top_k: int) -> BatchClassification:
        k = self.check_top_k(top_k)
        if len(images) > self.settings.max_batch_files:
            raise InvalidArgument(f"images: at most {self.settings.max_batch_files} items "
                                  f"(TAILWISE_MAX_BATCH_FILES), got {len(images)}")
        arrays, errors = [], []
        for i, data in enumerate(images):
            try:
                arrays.append(await self.decode(data, f"images[{i}]"))
                errors.append(None)
            except InvalidArgument as exc:
                errors.append(str(exc))
        answers = iter(self.answers(await self.logits(np.stack(arrays)), k) if arrays else ())
        failed = {"predictions": [], "set": None, "unsure": None}
        return BatchClassification(provider=self.provider, results=[
            FileClassification(index=i, filename=getattr(images[i], "filename", None),
                               **(next(answers) if error is None else failed), error=error)
            for i, error in enumerate(errors)])

    @bentoml.api(input_spec=NoArguments)
    def model_info(self) -> dict:
        """The served model (its folder name), classes, training counts, groups, test metrics (fractions 0..1),
        input, versions, provider and request limits."""
        meta = self.model.meta
        return {"model": self.model.path.parent.name, **{key: meta[key] for key in (
                    "class_names", "num_classes", "train_counts", "groups", "group_thresholds", "metrics", "input",
                    "logit_adjustment", "prediction_sets", "dataset", "weights_sha256", "created_at")},
                "exported_with": meta["tailwise_version"], "tailwise_version": __version__,
                "coverage": self.sets and self.sets["coverage"], "provider": self.provider, "providers": self.model.providers,
                "batching": self.batcher is not None, "images_on_event_loop": min(self.loop_images, self.settings.max_batch_size),
                "verified": self.settings.verify, "one_image_call_ms": round(1000 * self.call_s, 3), "onnxruntime_threads": {"batch": threads(self.model), "one_image": threads(self.solo)},
                "limits": {**self.settings.limits(), "max_top_k": meta["num_classes"]}}


def warm_up(model: OnnxClassifier, calls: int = 5) -> float:
    """The fastest of `calls` one-image model calls, in seconds (the first calls also warm onnxruntime up)."""
    pixels = np.zeros((1, *model.input_shape), np.uint8)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model.predict_arrays(pixels)
        times.append(time.perf_counter() - start)
    return min(times)


def small_image(data: bytes, max_pixels: int) -> bool:
    """Whether `data` is a PNG or GIF whose header gives at most `max_pixels` pixels (read from the fixed header
    bytes: opening it with Pillow costs more than decoding a thumbnail); other formats count as large."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
    elif data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
    else:
        return len(data) < 64  # not an image at all: failing costs nothing
    return width * height <= max_pixels


quiet_client_errors()
TailwiseClassifier.add_asgi_middleware(Guard)
TailwiseClassifier.mount_asgi_app(docs_app(TailwiseClassifier, MODEL_PATH, MODEL_META), path="/")
