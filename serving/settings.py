"""The service's settings from the environment (TAILWISE_*), read when the service (or `tailwise serve`) starts.

    TAILWISE_MAX_UPLOAD_BYTES  largest request body in bytes (default 16 MiB)
    TAILWISE_MAX_PIXELS        largest image, width * height, refused before decoding (default 50 megapixels)
    TAILWISE_MAX_BATCH_FILES   most files in one /classify_batch request (default 64)
    TAILWISE_BATCHING          "0": every request runs the model on its own, without batching (default "1")
    TAILWISE_MAX_BATCH_SIZE    most images in one batched model call (default 64)
    TAILWISE_MAX_IN_FLIGHT     most classify requests in a worker at once, the rest get 503 (default: MAX_BATCH_SIZE)
    TAILWISE_VERIFY            "0": load the model without checking its manifest (default "1")
    TAILWISE_ORT_THREADS       onnxruntime intra-op threads per worker (default: the cores / the workers)
    TAILWISE_ORT_SPINNING      how a lone image runs: "auto" (default): on one thread that sleeps between calls or
                               on every thread spinning (onnxruntime's default), whichever has been faster lately
                               (serving/sessions.py); "1": the cores are the service's own, every call on spinning
                               threads; "0": never spin (a lone image on one thread). Batches run on threads that
                               sleep between calls unless "1"
    TAILWISE_INLINE_PIXELS     PNG/GIF images up to this many pixels are decoded on the event loop (cheaper than
                               a thread hop); others in a thread pool (default 262144, 512 x 512)
    TAILWISE_MODEL_ON_LOOP     "auto" (default): a model call of one image runs on the event loop when it takes
                               under LOOP_MODEL_MS (a thread hop and the GIL hand-over back cost more than that),
                               larger batches in a thread; "1": every call on the loop; "0": every call in a thread
    TAILWISE_DIRECT            "0": the classify paths go through BentoML's own request dispatch, not tailwise's
                               direct one (same parsing, method and answers; slower, serving/middleware.py)
    TAILWISE_COVERAGE          the coverage of the prediction set every answer carries: one the model was
                               calibrated for (e.g. 0.95), or "off" (set and unsure null); default: the model's
                               default coverage
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from tailwise import UserError, conformal


def env_int(name: str, default: int | None, environ: Mapping[str, str] = os.environ) -> int | None:
    """A positive integer from $name, or `default` when it is unset or empty; a bad value is a one-line error."""
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {text!r}") from None
    if value < 1:
        raise UserError(f"{name} must be >= 1, got {value}")
    return value


def env_flag(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """"0" is False, "1" True, unset or empty `default`; anything else is a one-line error."""
    text = environ.get(name, "").strip()
    if text not in ("", "0", "1"):
        raise UserError(f"{name} must be 0 or 1, got {text!r}")
    return default if not text else text == "1"


def env_choice(name: str, choices: tuple[str, ...], environ: Mapping[str, str] = os.environ) -> str:
    """One of `choices` from $name (the first when it is unset or empty); anything else is a one-line error."""
    text = environ.get(name, "").strip() or choices[0]
    if text not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return text


LOOP_MODEL_MS = 2.0


@dataclass(frozen=True)
class Settings:
    max_upload_bytes: int = 16 * 2**20
    max_pixels: int = 50_000_000
    max_batch_files: int = 64
    batching: bool = True
    max_batch_size: int = 64
    max_in_flight: int = 64
    verify: bool = True
    ort_threads: int | None = None
    ort_spinning: str = "auto"
    inline_pixels: int = 512 * 512
    model_on_loop: str = "auto"
    direct: bool = True
    coverage: str | None = None   # None: the model's default; "off"; or a number, checked against the model

    def sets_level(self, record: dict | None) -> dict | None:
        """The calibrated level of the model's prediction sets (`record`, its metadata's) that TAILWISE_COVERAGE
        chooses (tailwise.conformal.level); UserError naming the setting when the model has no such level."""
        try:
            return conformal.level(record, self.coverage)
        except ValueError as exc:
            raise UserError(f"TAILWISE_COVERAGE: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        """Every TAILWISE_* setting (raises UserError naming the first bad one)."""
        max_batch = env_int("TAILWISE_MAX_BATCH_SIZE", 64, environ)
        return cls(max_upload_bytes=env_int("TAILWISE_MAX_UPLOAD_BYTES", cls.max_upload_bytes, environ),
                   max_pixels=env_int("TAILWISE_MAX_PIXELS", cls.max_pixels, environ),
                   max_batch_files=env_int("TAILWISE_MAX_BATCH_FILES", cls.max_batch_files, environ),
                   batching=env_flag("TAILWISE_BATCHING", True, environ),
                   max_batch_size=max_batch,
                   max_in_flight=env_int("TAILWISE_MAX_IN_FLIGHT", max_batch, environ),
                   verify=environ.get("TAILWISE_VERIFY", "1").strip() != "0",  # integrity.verify_enabled's rule
                   ort_threads=env_int("TAILWISE_ORT_THREADS", None, environ),
                   ort_spinning=env_choice("TAILWISE_ORT_SPINNING", ("auto", "1", "0"), environ),
                   inline_pixels=env_int("TAILWISE_INLINE_PIXELS", cls.inline_pixels, environ),
                   model_on_loop=env_choice("TAILWISE_MODEL_ON_LOOP", ("auto", "0", "1"), environ),
                   direct=env_flag("TAILWISE_DIRECT", True, environ),
                   coverage=environ.get("TAILWISE_COVERAGE", "").strip() or None)

    def limits(self) -> dict:
        """The request limits, as /model_info shows them."""
        return {"max_upload_bytes": self.max_upload_bytes, "max_pixels": self.max_pixels,
                "max_batch_files": self.max_batch_files, "max_batch_size": self.max_batch_size,
                "max_in_flight": self.max_in_flight}
