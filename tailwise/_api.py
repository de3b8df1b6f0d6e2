"""The public Python API (`tailwise.load`, `tailwise.train`, `tailwise.export`, `tailwise.evaluate`);
`tailwise/__init__.py` imports this module only when one of them is first used, so `import tailwise` stays cheap
and torch-free.

`load` needs numpy, pillow, onnx and onnxruntime only (no torch); `train`, `export` and `evaluate` call the same
library functions as the `tailwise train`, `export` and `evaluate` commands (training.launch,
export.model_folder), with keyword arguments, and need the torch dependencies. An error about an argument names
it as this API spells it (`budget=`), not as the command line does (`--budget`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from tailwise.serving.artifact import OnnxClassifier, load_image
from tailwise._core import DEFAULT_MAX_PIXELS, ImageError, image_pixels

if TYPE_CHECKING:
    from PIL import Image as _PILImage

Image = Union[str, os.PathLike, bytes, "_PILImage.Image", np.ndarray]
"""One image: a file path, the bytes of an image file, a PIL image, or a uint8 array (H x W grayscale,
H x W x 3 RGB or H x W x 4 RGBA, or already the model's input C x H x W)."""

Prediction = dict[str, Any]
"""{"label": str, "index": int, "probability": float, "group": "many" | "medium" | "few"}"""

Answer = dict[str, Any]
"""{"predictions": [Prediction, ...] (the top-k, best first), "set": [str, ...] or None (the labels of the
conformal prediction set, most probable first), "unsure": bool or None (the set is not exactly one label)}: the
answer of `tailwise predict` and the service for one image. "set" and "unsure" are None for a model exported
without prediction sets, or with coverage="off"."""


class Classifier:
    """An exported tailwise model (a model folder or its `model.onnx`) run by onnxruntime, no torch.

    Every image is decoded and resized exactly as `tailwise predict` and the service do, and the predictions
    are the same records, logit adjustment (the model's served `tau`) included."""

    def __init__(self, path: str | os.PathLike, *, providers: list[str] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, verify: bool | None = None):
        self._model = OnnxClassifier(path, providers=providers, verify=verify)
        self._max_pixels = max_pixels

    @property
    def path(self) -> Path:
        """The model.onnx file."""
        return self._model.path

    @property
    def class_names(self) -> list[str]:
        return list(self._model.class_names)

    @property
    def metadata(self) -> dict:
        """The model's "tailwise" metadata (classes, input size, groups, logit adjustment, metrics ...)."""
        return self._model.meta

    def pixels(self, images: Image | Sequence[Image]) -> np.ndarray:
        """The model's input for `images`: uint8 [N, C, H, W]. Raises ImageError (a ValueError) naming the image
        that cannot be decoded."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return self._array(images, "<array>") if images.shape[1:] == self._model.input_shape else np.stack(
                [self._one(image, f"<array {i}>") for i, image in enumerate(images)])
        if _is_single(images):
            images = [images]
        arrays = [self._one(image, f"<image {i}>") for i, image in enumerate(images)]
        if not arrays:
            return np.zeros((0, *self._model.input_shape), dtype=np.uint8)
        return np.stack(arrays)

    def predict_logits(self, images: Image | Sequence[Image], *, adjusted: bool = True,
                       batch_size: int = 256) -> np.ndarray:
        """float32 [N, num_classes] for `images` (one image or a sequence; a uint8 [N, C, H, W] array is a batch
        of model inputs). `adjusted`: with the model's logit adjustment (the logits the served predictions come
        from); False: the network's plain logits."""
        pixels = self.pixels(images)
        chunks = [self._model.predict_arrays(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
        logits = np.concatenate(chunks) if chunks else np.zeros((0, len(self._model.class_names)), np.float32)
        return self._model.adjusted_logits(logits) if adjusted else logits

    @property
    def coverages(self) -> list[float]:
        """The coverages this model's prediction sets were calibrated for (the first is the default); empty for a
        model exported without them."""
        from tailwise.conformal import coverages

        return coverages(self._model.meta["prediction_sets"])

    def predict(self, images: Image | Sequence[Image], top_k: int = 3,
                coverage: float | str | None = None) -> Answer | list[Answer]:
        """The answer for each image, as `tailwise predict` and the service give it: {"predictions": the `top_k`
        most probable classes, best first, as {"label", "index", "probability", "group"}; "set": the labels of
        its conformal prediction set; "unsure": the set is not exactly one label} (see `Answer`). For one image,
        its answer; for a sequence of images (or a uint8 [N, C, H, W] batch), one answer per image.
        `coverage`: the sets' coverage, one of `coverages` (None: the model's default; "off": no sets, "set" and
        "unsure" None); ValueError for one the model was not calibrated for."""
        chosen = self._model.sets_level(coverage)   # a bad coverage fails before any image is decoded
        results = self._model.answers(self.predict_logits(images, adjusted=False), top_k, chosen or "off")
        single = _is_single(images) and not (isinstance(images, np.ndarray) and images.ndim == 4)
        return results[0] if single else results

    def _one(self, image: Image, where: str) -> np.ndarray:
        if isinstance(image, np.ndarray):
            return self._array(image, where)
        if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            return load_image(image, self._model.meta, max_pixels=self._max_pixels)
        if hasattr(image, "getbands"):  # a PIL image (PIL imported only where one is passed)
            return image_pixels(image, self._model.meta, self._max_pixels, where)
        raise TypeError(f"{where}: expected a path, image bytes, a PIL image or a uint8 array, "
                        f"got {type(image).__name__}")

    def _array(self, array: np.ndarray, where: str) -> np.ndarray:
        if array.dtype != np.uint8:
            raise ImageError(f"{where}: arrays must be uint8 (0..255), got {array.dtype}")
        shape = self._model.input_shape
        if array.shape[-3:] == shape:   # already the model's input (C x H x W, or N x C x H x W)
            return np.ascontiguousarray(array)
        from PIL import Image as PILImage

        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
            return image_pixels(PILImage.fromarray(np.ascontiguousarray(array)), self._model.meta,
                                self._max_pixels, where)
        raise ImageError(f"{where}: array of shape {list(array.shape)} is not H x W, H x W x 3, H x W x 4 or the "
                         f"model's input {list(shape)}")

    def __repr__(self) -> str:
        return f"tailwise.Classifier({str(self.path)!r}, {len(self._model.class_names)} classes)"


def _is_single(images) -> bool:
    return isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)) or hasattr(
        images, "getbands")


def load(path: str | os.PathLike | None = None, *, providers: list[str] | None = None,
         max_pixels: int | None = DEFAULT_MAX_PIXELS, verify: bool | None = None) -> Classifier:
    """The exported model at `path` (a model folder such as models/NAME, or its model.onnx), ready to predict;
    no `path`: the default model ($TAILWISE_MODEL, else the model shipped with tailwise; tailwise.format.
    default_model). "models/fmnist-lt-tailwise" names the shipped model from any folder (format.find_model).
    `providers`: onnxruntime execution providers (default CUDA when available, then CPU). `verify`: check the
    file against the folder's manifest.json first, as `tailwise predict` does (None: unless TAILWISE_VERIFY=0;
    False: skip it)."""
    from tailwise.format import default_model, find_model

    path = default_model() if path is None else find_model(path)
    return Classifier(path, providers=providers, max_pixels=max_pixels, verify=verify)


def train(config: str | os.PathLike | None = None, *, data: str | os.PathLike | None = None,
          test: str | os.PathLike | None = None, budget: float | None = None, minutes: float | None = None,
          out: str | os.PathLike | None = None, stage: int | None = None, epochs: int | None = None,
          device: str | None = None, seed: int | None = None, resume: bool = False, progress: bool = True,
          **overrides: Any) -> Path:
    """`tailwise train`: train a recipe (a name from training/recipes/ or a TOML file; default the `tailwise`
    recipe), or the default recipe sized for your own folder (`data`, with `test`, `budget` or `minutes`), into
    `out` (default runs/<config name>) and return the run folder (training.launch.train). `overrides` set config
    fields, as `--set` does: `stage2={"sampler": "random"}` or `stage2__sampler="random"`."""
    from tailwise.training.launch import train as train_run

    return train_run(config, out, data=data, test=test, budget=budget, minutes=minutes, stage=stage, epochs=epochs,
                     device=device, seed=seed, resume=resume, progress=progress, overrides=dict(_flatten(overrides)))


def export(run: str | os.PathLike, out: str | os.PathLike, *, force: bool = False, variants: Sequence[str] = (),
           parity_images: int = 256, opset: int | None = None, samples: int = 0,
           coverage: float | Sequence[float] | None = 0.9) -> Path:
    """`tailwise export`: export a run's final classifier (a run folder or a checkpoint) to the model folder `out`
    and return `out` (export.model_folder.export_run). The folder is kept only if onnxruntime reproduces torch
    on validation images; else ExportParityError, and `out` is left as it was. `coverage`: the conformal prediction
    sets to calibrate on the run's validation split (one coverage or several, the first the default; None: none)."""
    from tailwise.export.model_folder import DEFAULT_OPSET, export_run

    export_run(run, out, force=force, variants=tuple(variants), parity_images=parity_images,
               opset=DEFAULT_OPSET if opset is None else opset, samples=samples, coverage=coverage)
    return Path(out)


def evaluate(path: str | os.PathLike, *, device: str = "auto", out: str | os.PathLike | None = None,
             data: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """`tailwise evaluate`: the test report of a run's final classifier or of an exported model folder: plain
    logits, and "logit_adjusted" (what is served) when the model adjusts its logits (training.launch.evaluate).
    `data`: an exported model's report on this labelled folder (one subfolder of images per class) instead.
    `out`: also write report.json and per_class.png there (a run: by default into its eval/ folder).
    `progress`: say on stderr what it is doing."""
    from tailwise.training.launch import evaluate as evaluate_path

    return evaluate_path(path, device=device, out=out, data=data, progress=progress).report


def _flatten(overrides: dict, prefix: str = ""):
    for key, value in overrides.items():
        name = prefix + key.replace("__", ".")
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


def predict_dataset(dataset, model: str | os.PathLike, *, top_k: int = 3, batch_size: int = 64,
                    actors: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    verify: bool | None = None, coverage: float | str | None = None):
    """`tailwise predict --engine ray` for your own Ray pipeline (needs `pip install 'tailwise[ray]'`): a
    ray.data.Dataset with a "path" column of image files or a "bytes" column of their contents (as
    `ray.data.read_binary_files(..., include_paths=True)` gives) -> the Dataset of rows {"path", "predictions"
    (the top_k records of `predict`), "set", "unsure" (at `coverage`, as `predict`), "error" (None, or why the image could not be read), and the top-1
    "label", "index", "probability", "group"}. Images are decoded in Ray tasks and classified by `actors` model
    actors (default half the cluster's CPUs); `model` must be readable at that path on every node."""
    from tailwise.serving.ray_engine import predict_dataset as run

    return run(dataset, model, top_k=top_k, batch_size=batch_size, actors=actors, max_pixels=max_pixels,
               verify=verify, coverage=coverage)
