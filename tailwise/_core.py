"""The small core every layer may import: image decoding and its file extensions, group names, sha256 of a
file, atomic writes. It imports neither torch nor onnx/onnxruntime (numpy and Pillow only), so training,
export and serving share it without importing each other (docs/ARCHITECTURE.md; tests/test_import_rules.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

GROUP_NAMES = ("many", "medium", "few")
RESIZE_POLICIES = ("resize", "shorter-center-crop")
# Formats decoded in-process by Pillow; others (EPS would start Ghostscript, PDF, ...) are refused.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")  # JPEG covers MPO (phone cameras)
# The file names taken as images when a folder is searched (class folders in training, `tailwise predict DIR`).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default Image.MAX_IMAGE_PIXELS (~ 9459 x 9459)


# --------------------------------------------------------------------------------------------- files

def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success fsync it and os.replace it into place (mode 0644).
    A reader sees the old file or the whole new one, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# --------------------------------------------------------------------------------------------- images

class ImageError(ValueError):
    """An input that cannot be turned into model pixels (not an image, empty, truncated, too large, odd mode)."""


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa")


def load_image(source: str | os.PathLike | bytes, meta: dict, max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> np.ndarray:
    """Decode an image file or its bytes into the model's input: uint8 [C, H, W].

    Formats: IMAGE_FORMATS. Every image goes the same way: EXIF orientation applied (ImageOps.exif_transpose);
    first frame only; transparency composited on white; 16/32-bit integer images ('I;16*', 'I') read as
    16-bit and scaled to 8 bits (round(v / 257), so an 8-bit image stored as 16-bit comes back unchanged);
    then converted to 'RGB' (palette, CMYK, YCbCr, 1-bit ...) and, for 1-channel models, to 'L' (ITU-R 601
    luma).
    Geometry follows meta["input"]["resize_policy"]:
      "resize": bilinear resize to exactly H x W (aspect ratio not kept; for small native sizes, FMNIST 28x28);
      "shorter-center-crop": bilinear resize so the image covers H x W (the shorter side matches; sizes
        rounded), then a centre crop of H x W (what training does to file datasets).
    Images larger than `max_pixels` (width * height, None: no limit of ours) are refused before decoding;
    Pillow's own decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, x2) still applies above it.
    Raises ImageError naming the source for anything that is not a readable image.
    """
    where = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageError(f"{where}: cannot read file ({exc.strerror or exc})") from None
    if not data:
        raise ImageError(f"{where}: empty file, not an image")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            return image_pixels(image, meta, max_pixels, where)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where}: too many pixels ({exc})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as exc:  # malformed headers
        raise ImageError(f"{where}: corrupt or truncated image ({type(exc).__name__}: {exc})") from None


def image_pixels(image: Image.Image, meta: dict, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 where: str = "<image>") -> np.ndarray:
    """An opened Pillow image as the model's input uint8 [C, H, W], by load_image's rules."""
    spec = meta["input"]
    try:
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageError(f"{where}: {image.width}x{image.height} image has more than max_pixels="
                             f"{max_pixels} pixels")
        image.load()
        image = _to_mode(ImageOps.exif_transpose(image), "L" if spec["channels"] == 1 else "RGB", where)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where}: too many pixels ({exc})") from None
    except Exception as exc:  # Pillow's decoders raise OSError for truncation, others for malformed headers
        raise ImageError(f"{where}: corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    image = _fit(image, spec["width"], spec["height"], spec["resize_policy"])
    array = np.asarray(image, dtype=np.uint8)
    return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))


def _to_mode(image: Image.Image, mode: str, where: str) -> Image.Image:
    """`image` as 'L' or 'RGB' (see load_image for the rules)."""
    source_mode = image.mode
    if source_mode == "F":  # float pixels have no agreed scale (0..1? 0..255?)
        raise ImageError(f"{where}: unsupported image mode 'F' (32-bit float pixels)")
    try:
        if source_mode.startswith("I"):  # 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N'
            values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
            image = Image.fromarray(((values + 128) // 257).astype(np.uint8), "L")
        elif source_mode in _ALPHA_MODES or "transparency" in image.info:
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
        if image.mode == mode:
            return image
        if image.mode == "1" or (image.mode == "L" and mode == "RGB"):
            return image.convert(mode)
        image = image.convert("RGB")
        return image if mode == "RGB" else image.convert("L")
    except ValueError as exc:
        raise ImageError(f"{where}: unsupported image mode {source_mode!r} ({exc})") from None


def _fit(image: Image.Image, width: int, height: int, policy: str) -> Image.Image:
    if image.size == (width, height):
        return image
    if policy == "resize":
        return image.resize((width, height), Image.Resampling.BILINEAR)
    if policy != "shorter-center-crop":
        raise ValueError(f"unknown resize_policy {policy!r}; expected one of {RESIZE_POLICIES}")
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))
