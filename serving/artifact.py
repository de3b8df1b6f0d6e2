"""The exported model as serving sees it: the ONNX metadata schema, image preprocessing and `OnnxClassifier`.

This module is the one definition of both contracts between export and serving, and it imports no torch.

Metadata: `model.onnx` carries one `metadata_props` entry, key "tailwise", whose value is a JSON object:

    format_version     int, FORMAT_VERSION
    tailwise_version   str, the tailwise that exported the model
    class_names        [str] * num_classes
    num_classes        int
    input              {"name": "pixels", "dtype": "uint8", "layout": "NCHW", "range": [0, 255],
                        "channels": 1 or 3, "height": int, "width": int, "resize_policy": one of RESIZE_POLICIES}
    train_counts       [int] * num_classes, training images per class
    groups             ["many" | "medium" | "few"] * num_classes
    group_thresholds   {"many_above": int, "few_below": int}: many = count > many_above, few = count < few_below
    logit_adjustment   null or {"tau": float, "log_prior": [float] * num_classes}
    metrics            dict, the test report of the exported model (may be empty)
    weights_sha256     sha256 of the weights.safetensors shipped next to model.onnx (or null)
    dataset            {"name": str, "index_sha256": str or null}, the training set and its LT index hash
    created_at         ISO 8601 UTC time of the export

The graph maps `pixels` uint8[N, C, H, W] (0..255, normalisation is inside the graph) to `logits`
float32[N, num_classes].
"""

from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import tailwise
from tailwise import UserError, __version__
# Image decoding lives in the shared core (training decodes files exactly as serving does); re-exported here.
from tailwise._core import (DEFAULT_MAX_PIXELS, GROUP_NAMES, IMAGE_FORMATS, RESIZE_POLICIES,  # noqa: F401
                            ImageError, load_image)
from tailwise.serving.integrity import read_verified

# The metadata format this tailwise writes. Reading: a newer format is refused (upgrade tailwise); an older one
# is read if it is at least MIN_FORMAT_VERSION (upgraded to the current fields by parse_metadata), else refused
# (re-export the run). Format 1 is the first, so today every other version is refused.
FORMAT_VERSION = 1
MIN_FORMAT_VERSION = 1
METADATA_KEY = "tailwise"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
REPO_ROOT = Path(__file__).resolve().parent.parent  # the repository (or Bento) root; in a wheel, tailwise/
# The folder that holds the `tailwise` package: the repository root, a Bento's src/, or site-packages.
PACKAGE_PARENT = Path(tailwise.__file__).resolve().parent.parent
SHIPPED_MODEL = "fmnist-lt-tailwise"


# --------------------------------------------------------------------------------------------- metadata

def build_metadata(*, class_names, channels, height, width, resize_policy, train_counts, groups, group_thresholds,
                   dataset, weights_sha256=None, metrics=None, logit_adjustment=None, created_at=None) -> dict:
    """Assemble and validate the "tailwise" metadata object (see the module docstring for the fields)."""
    class_names = [str(name) for name in class_names]
    meta = {
        "format_version": FORMAT_VERSION,
        "tailwise_version": __version__,
        "class_names": class_names,
        "num_classes": len(class_names),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "range": [0, 255],
                  "channels": int(channels), "height": int(height), "width": int(width),
                  "resize_policy": resize_policy},
        "train_counts": [int(n) for n in train_counts],
        "groups": list(groups),
        "group_thresholds": {key: int(value) for key, value in dict(group_thresholds).items()},
        "logit_adjustment": None if logit_adjustment is None else {
            "tau": float(logit_adjustment["tau"]),
            "log_prior": [float(v) for v in logit_adjustment["log_prior"]]},
        "metrics": dict(metrics or {}),
        "weights_sha256": weights_sha256,
        "dataset": {"name": str(dataset["name"]), "index_sha256": dataset.get("index_sha256")},
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return validate_metadata(meta)


def validate_metadata(meta: dict) -> dict:
    """Check a metadata object against the schema; raises ValueError naming the first bad field. Returns `meta`."""
    def need(ok, field, what):
        if not ok:
            raise ValueError(f"tailwise metadata: {field} must be {what}, got {meta.get(field, '<missing>')!r:.200}")

    need(isinstance(meta, dict), "<root>", "a JSON object")
    need(meta.get("format_version") == FORMAT_VERSION, "format_version", f"{FORMAT_VERSION}")
    names = meta.get("class_names")
    need(isinstance(names, list) and names and all(isinstance(n, str) for n in names), "class_names",
         "a non-empty list of strings")
    n = len(names)
    need(meta.get("num_classes") == n, "num_classes", f"len(class_names) = {n}")
    spec = meta.get("input")
    need(isinstance(spec, dict), "input", "an object")
    fixed = {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW", "range": [0, 255]}
    need(all(spec.get(k) == v for k, v in fixed.items()), "input", f"an object with {fixed}")
    need(spec.get("channels") in (1, 3), "input", "an object with channels 1 or 3")
    need(all(isinstance(spec.get(k), int) and spec[k] > 0 for k in ("height", "width")), "input",
         "an object with positive integer height and width")
    need(spec.get("resize_policy") in RESIZE_POLICIES, "input", f"an object with resize_policy in {RESIZE_POLICIES}")
    counts = meta.get("train_counts")
    need(isinstance(counts, list) and len(counts) == n and all(isinstance(c, int) and c >= 0 for c in counts),
         "train_counts", f"{n} non-negative integers")
    groups = meta.get("groups")
    need(isinstance(groups, list) and len(groups) == n and all(g in GROUP_NAMES for g in groups), "groups",
         f"{n} of {GROUP_NAMES}")
    thresholds = meta.get("group_thresholds")
    need(isinstance(thresholds, dict) and set(thresholds) == {"many_above", "few_below"}
         and all(isinstance(v, int) for v in thresholds.values()), "group_thresholds",
         "{'many_above': int, 'few_below': int}")
    la = meta.get("logit_adjustment")
    need(la is None or (isinstance(la, dict) and set(la) == {"tau", "log_prior"}
                        and isinstance(la["tau"], (int, float)) and math.isfinite(la["tau"])
                        and isinstance(la["log_prior"], list) and len(la["log_prior"]) == n
                        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in la["log_prior"])),
         "logit_adjustment", f"null or {{'tau': float, 'log_prior': {n} finite floats}}")
    need(isinstance(meta.get("metrics"), dict), "metrics", "an object")
    sha = meta.get("weights_sha256")
    need(sha is None or (isinstance(sha, str) and len(sha) == 64), "weights_sha256", "null or a sha256 hex digest")
    ds = meta.get("dataset")
    need(isinstance(ds, dict) and isinstance(ds.get("name"), str) and "index_sha256" in ds, "dataset",
         "{'name': str, 'index_sha256': str or null}")
    need(isinstance(meta.get("tailwise_version"), str), "tailwise_version", "a string")
    need(isinstance(meta.get("created_at"), str), "created_at", "an ISO 8601 string")
    return meta


def write_metadata(onnx_model: onnx.ModelProto, meta: dict) -> None:
    """Validate `meta` and store it as the model's "tailwise" metadata_props entry (replacing an older one)."""
    text = json.dumps(validate_metadata(meta), sort_keys=True)
    kept = [p for p in onnx_model.metadata_props if p.key != METADATA_KEY]
    del onnx_model.metadata_props[:]
    onnx_model.metadata_props.extend(kept)
    onnx_model.metadata_props.add(key=METADATA_KEY, value=text)


def parse_metadata(text: str | None, where: str | os.PathLike) -> dict:
    """The metadata object from its JSON text; UserError naming `where` if it is absent or invalid."""
    if text is None:
        raise UserError(f"{where}: no '{METADATA_KEY}' metadata in this ONNX model (export it with `tailwise export`)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: '{METADATA_KEY}' metadata is not valid JSON ({exc})") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(f"{where}: model format {version} is newer than this tailwise {__version__} reads "
                        f"(format {FORMAT_VERSION}); upgrade tailwise (pip install -U tailwise)")
    if isinstance(meta, dict) and (not isinstance(version, int) or version < MIN_FORMAT_VERSION):
        raise UserError(f"{where}: model format {version} is older than this tailwise {__version__} reads "
                        f"(formats {MIN_FORMAT_VERSION}..{FORMAT_VERSION}); re-export the run with `tailwise export`")
    try:
        return validate_metadata(meta)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def read_metadata(path: str | os.PathLike, verify: bool | None = None) -> dict:
    """The "tailwise" metadata of a model file (or of a model folder's model.onnx), its bytes checked against
    the folder's manifest first (serving.integrity; `verify` None: unless TAILWISE_VERIFY=0)."""
    path = resolve_model_path(path)
    data = read_verified(path, verify)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises its own DecodeError; onnx may raise others
        raise UserError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if not model.graph.node and not props:
        raise UserError(f"{path}: not an ONNX model (no graph)")
    return parse_metadata(props.get(METADATA_KEY), path)


def model_summary(meta: dict) -> str:
    """'10 classes, test top-1 82.66 %': the accuracy of what is served (logit-adjusted when the model is), in
    percent, as everywhere a person reads it."""
    metrics = meta["metrics"]
    if meta["logit_adjustment"] is not None and isinstance(metrics.get("logit_adjusted"), dict):
        metrics = metrics["logit_adjusted"]
    top1 = metrics.get("top1")
    accuracy = f", test top-1 {100 * top1:.2f} %" if isinstance(top1, (int, float)) else ""
    return f"{meta['num_classes']} classes{accuracy}"


def resolve_model_path(path: str | os.PathLike) -> Path:
    """A model file, or a model folder's `model.onnx`; UserError naming the path if there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    return path


def default_model_path(models_dir: str | os.PathLike | None = None) -> Path:
    """The model to use when none is given, in this order:

    1. $TAILWISE_MODEL (a model folder or .onnx file);
    2. the newest `models/*/model.onnx` (by modification time) under the current directory;
    3. the newest `models/*/model.onnx` of the repository this file lives in (the shipped model).

    `models_dir` replaces both folders of 2 and 3 (tests)."""
    env = os.environ.get("TAILWISE_MODEL")
    if env:
        try:
            return resolve_model_path(env)
        except UserError as exc:
            raise UserError(f"TAILWISE_MODEL: {exc}") from None
    folders = [Path(models_dir)] if models_dir is not None else [Path("models"), REPO_ROOT / "models"]
    for folder in folders:
        found = sorted(folder.glob("*/model.onnx"), key=lambda p: (p.stat().st_mtime, str(p)))
        if found:
            return found[-1]
    raise UserError(f"no model in {' or '.join(f'{f}/*/model.onnx' for f in dict.fromkeys(folders))}: pass "
                    "--model, set TAILWISE_MODEL, or export one with `tailwise export`")


# --------------------------------------------------------------------------------------------- inference

class OnnxClassifier:
    """An exported tailwise model in an onnxruntime session.

    `providers`: onnxruntime execution providers in order of preference; default CUDA first when this
    onnxruntime has it, then CPU. `.providers` lists those the session really uses.
    `intra_op_threads`: CPU threads per inference call (default: onnxruntime's, one per physical core).
    `verify`: check the file against its folder's manifest before loading (serving.integrity; None: unless
    TAILWISE_VERIFY=0); the session is built from the very bytes that were checked.
    `spinning`: False stops onnxruntime's idle threads from busy-waiting for the next call (cores shared with
    request handling, as in the service); None keeps onnxruntime's default (spinning).
    """

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, verify: bool | None = None, spinning: bool | None = None):
        self.path = resolve_model_path(path)
        data = read_verified(self.path, verify)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self.session = ort.InferenceSession(data, options, providers=providers)
        except Exception as exc:  # onnxruntime's InvalidProtobuf, Fail, NoSuchFile ...
            raise UserError(f"{self.path}: onnxruntime cannot load this model ({exc})") from None
        self.meta = parse_metadata(self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY), self.path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [(i.name, i.type) for i in inputs] != [(INPUT_NAME, "tensor(uint8)")] or outputs[0].name != OUTPUT_NAME:
            raise UserError(f"{self.path}: graph must take one uint8 input {INPUT_NAME!r} and output "
                            f"{OUTPUT_NAME!r}, has inputs {[(i.name, i.type) for i in inputs]}, "
                            f"outputs {[o.name for o in outputs]}")
        self.providers = self.session.get_providers()
        spec = self.meta["input"]
        self.input_shape = (spec["channels"], spec["height"], spec["width"])
        self.class_names = self.meta["class_names"]

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits float32 [N, num_classes] for uint8 pixels [N, C, H, W]."""
        batch = np.asarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[1:] != self.input_shape:
            raise ValueError(f"expected uint8 [N, {', '.join(map(str, self.input_shape))}], "
                             f"got {batch.dtype} {list(batch.shape)}")
        if len(batch) == 0:
            return np.zeros((0, self.meta["num_classes"]), dtype=np.float32)
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})
        return logits.astype(np.float32, copy=False)

    def adjusted_logits(self, logits: np.ndarray) -> np.ndarray:
        """Logits with the metadata's logit adjustment, if any: adjusted = logits - tau * log_prior
        (log_prior = log of the training class frequencies), which removes the training set's head bias."""
        la = self.meta["logit_adjustment"]
        if la is None:
            return np.asarray(logits, dtype=np.float32)
        return (np.asarray(logits, dtype=np.float32)
                - np.float32(la["tau"]) * np.asarray(la["log_prior"], dtype=np.float32))

    def check_top_k(self, k: int) -> int:
        """`k` if 1 <= k <= num_classes, else ValueError: the one top_k rule of `predict` and the service."""
        n = self.meta["num_classes"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"top_k must be an integer from 1 to {n} (this model's classes), got {k!r}")
        return k

    def top_k(self, logits: np.ndarray, k: int = 3) -> list[list[dict]]:
        """Per image, the k most probable classes (softmax of the adjusted logits), best first, as
        {"label", "index", "probability", "group"}. `k` must pass check_top_k."""
        k = self.check_top_k(k)
        adjusted = self.adjusted_logits(logits).astype(np.float64)
        probs = np.exp(adjusted - adjusted.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[{"label": self.class_names[c], "index": int(c), "probability": float(row[c]),
                  "group": self.meta["groups"][c]} for c in top] for row, top in zip(probs, order)]
