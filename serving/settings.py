"""The service's settings from the environment (TAILWISE_*), parsed once and checked before the server starts."""

from __future__ import annotations

import os

from tailwise import UserError


def env_int(name: str, default: int) -> int:
    """A positive integer from $name, or `default` when it is unset or empty; a bad value is a one-line error."""
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


def limits() -> dict:
    """Every numeric TAILWISE_* setting of the service (raises UserError naming the first bad one)."""
    max_batch = env_int("TAILWISE_MAX_BATCH_SIZE", 64)
    return {
        "max_upload_bytes": env_int("TAILWISE_MAX_UPLOAD_BYTES", 16 * 2**20),
        "max_pixels": env_int("TAILWISE_MAX_PIXELS", 50_000_000),
        "max_batch_files": env_int("TAILWISE_MAX_BATCH_FILES", 64),
        "max_batch_size": max_batch,
        "max_in_flight": env_int("TAILWISE_MAX_IN_FLIGHT", max_batch),
        "ort_threads": env_int("TAILWISE_ORT_THREADS", 0) if os.environ.get("TAILWISE_ORT_THREADS", "").strip() else None,
    }
